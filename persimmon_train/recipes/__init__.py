"""Every `persimmon-train` command (job) as one entry of data, so a plain wheel can run them all.

A Hydra job (`runs` "train" or "evaluate") is its name, its config (persimmon_train/conf/<job>.yaml,
which names the task) and the data formats it trains on: `persimmon-train <job>` composes that
config with the command line and hands it to `persimmon_train.recipes.train.train`, which trains
any task and then exports (or to `training.run.evaluate`). Adding such a job is one line here plus
its config (and, for a new kind of head, its entry in training/tasks.py). The
other commands are modules of this package with a `run(argv)`. The top-level `recipes/<job>.py`
files run `persimmon_train.recipes.main.main([<job>, ...])`.
"""

from __future__ import annotations

from typing import NamedTuple


class Job(NamedTuple):
    runs: str  # "train" / "evaluate" (Hydra jobs), else the module persimmon_train.recipes.<runs>
    what: str  # the line `persimmon-train` and `persimmon-train ls` print
    formats: tuple[str, ...] = ()  # the data.format values a training job's data configs use (for `ls`)


# The order is the order `persimmon-train` and `ls` print.
JOBS = {
    "finetune": Job("train", "causal-LM fine-tuning, full or LoRA (Hydra config: finetune)", ("text", "chat")),
    "classify": Job("train", "sequence classification (Hydra config: classify)", ("classification",)),
    "tag": Job("train", "token classification / NER tags (Hydra config: tag)", ("token_classification",)),
    "dpo": Job(
        "train", "preference tuning: DPO on chosen/rejected pairs, LoRA or full (Hydra config: dpo)", ("preference",)
    ),
    "reward": Job(
        "train", "reward model: Bradley-Terry on chosen/rejected pairs (Hydra config: reward)", ("preference",)
    ),
    "evaluate": Job("evaluate", "evaluate a model folder or checkpoint (Hydra config: evaluate)"),
    "estimate": Job("estimate", "what one rank of a run will hold in memory, from its config (no weights read)"),
    "prepare": Job("prepare", "tokenize and pack a run's data into the cache (CPU), print rows and packing"),
    "export": Job("export", "export a training checkpoint to a Hugging Face folder or PEFT adapter"),
    "generate": Job("generate", "generate text from an export or a checkpoint"),
    "convert-adept": Job("convert_adept", "convert ADEPT's original release to a Hugging Face folder"),
}

# The Hydra jobs: each has persimmon_train/conf/<job>.yaml.
HYDRA_JOBS = tuple(name for name, job in JOBS.items() if job.runs in ("train", "evaluate"))
TRAINING_JOBS = tuple(name for name, job in JOBS.items() if job.runs == "train")
