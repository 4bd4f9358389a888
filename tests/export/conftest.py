"""Real training checkpoints for the export tests, made once per session by the real recipes (in-process).

Each run stops at step 3 with a checkpoint at step 3 and `final/` (fp32) written from the live
model at the same step, so an export of the checkpoint must reproduce `final/` exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import FAST, demo_tokenizer, recipe_env, run_environ, run_in_process, save_tiny_base, tiny_config

STEPS = 3
QUICK = [
    *FAST,
    f"trainer.max_steps={STEPS}",
    f"checkpoint.every_n_steps={STEPS}",
    "trainer.eval_at_start=false",
    "trainer.eval_max_batches=1",
    "trainer.eval_every_n_steps=0",
]


@pytest.fixture(scope="session")
def export_env(tmp_path_factory) -> dict:
    return recipe_env(tmp_path_factory.mktemp("export_env"))


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, export_env) -> Path:
    """A random tiny causal LM saved as an HF folder: the `model.path` of the LoRA runs."""
    tokenizer = demo_tokenizer(Path(export_env["PERSIMMON_TRAIN_CACHE"]) / "demo")
    path = tmp_path_factory.mktemp("base") / "tiny-base"
    save_tiny_base(path, tokenizer, tiny_config(tokenizer), seed=1234)
    return path


def _train(tmp_path_factory, env, job: str, name: str, *overrides: str) -> Path:
    """The recipe's command in this process (a child would add seconds of start-up for each run)."""
    out = tmp_path_factory.mktemp("runs") / name
    ran = run_in_process(job, *QUICK, *overrides, f"output_dir={out}", environ=run_environ(env))
    assert ran.returncode == 0, ran.stderr[-5000:]
    assert (out / "checkpoints" / f"step_{STEPS}").is_dir() and (out / "final").is_dir()
    return out


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, export_env) -> Path:
    return _train(tmp_path_factory, export_env, "finetune", "full", "peft=none", "optim.lr=3e-3")


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, export_env, base_dir) -> Path:
    """LoRA over model.path (rslora on, to check the scale is the trained one)."""
    return _train(
        tmp_path_factory,
        export_env,
        "finetune",
        "lora",
        "peft=lora",
        "peft.r=8",
        "peft.alpha=16",
        "peft.use_rslora=true",
        "optim.lr=2e-2",
        f"model.path={base_dir}",
    )


@pytest.fixture(scope="session")
def lora_random_run(tmp_path_factory, export_env) -> Path:
    """LoRA over a random init: export must rebuild the trainer's seeded base exactly."""
    return _train(
        tmp_path_factory,
        export_env,
        "finetune",
        "lora_random",
        "peft=lora",
        "peft.r=4",
        "optim.lr=2e-2",
        "trainer.seed=7",
    )


@pytest.fixture(scope="session")
def classify_run(tmp_path_factory, export_env, base_dir, classification_files) -> Path:
    """LoRA classifier over a causal-LM base: lm_head is dropped, the trained score head comes along."""
    train, evals = classification_files
    return _train(
        tmp_path_factory,
        export_env,
        "classify",
        "classify",
        "peft=lora",
        "peft.r=4",
        "optim.lr=1e-2",
        f"model.path={base_dir}",
        f"data.train_files=[{train}]",
        f"data.eval_files=[{evals}]",
    )


def checkpoint_of(run: Path) -> Path:
    return run / "checkpoints" / f"step_{STEPS}"
