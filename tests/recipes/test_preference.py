"""`persimmon-train dpo` and `persimmon-train reward` really run on the demo preference pairs and learn."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import FAST, REPO, read_metrics, recipe_env, run_recipe, run_recipe_here, wait_for

# eval on the first 6 batches of held-out pairs (~130 pairs)
SMALL = [
    *FAST,
    "data.seq_len=128",
    "trainer.eval_every_n_steps=0",
    "trainer.eval_max_batches=6",
    "checkpoint.every_n_steps=0",
]
TRL_NAMES = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
}


def _evals(out) -> list[dict]:
    return [r for r in read_metrics(out) if "eval_loss" in r]


@pytest.mark.slow  # a real run (in this process: its outputs are checked)
def test_dpo_lora_learns_the_demo_preferences(tmp_path):
    out = tmp_path / "dpo"
    proc = run_recipe_here(
        "dpo",
        *SMALL,
        "trainer.max_steps=30",
        "optim.lr=5e-3",
        "dpo.beta=0.5",
        f"output_dir={out}",
        env=recipe_env(tmp_path),
    )
    first, last = _evals(out)[0], _evals(out)[-1]
    # LoRA starts as the reference: every reward is 0, no pair is ranked yet (ties)
    assert first["eval_rewards/accuracies"] == 0.0 and first["eval_rewards/margins"] == 0.0
    assert last["eval_rewards/accuracies"] >= 0.9 and last["eval_rewards/margins"] > 0.5, last
    assert last["eval_loss"] < first["eval_loss"] - 0.2
    train = [r for r in read_metrics(out) if "loss" in r and "eval_loss" not in r]
    assert TRL_NAMES <= set(train[-1]) and {f"eval_{k}" for k in TRL_NAMES} <= set(last)
    assert "reference: the same model with its LoRA adapters disabled" in proc.stderr
    assert (out / "final" / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow  # a real run (in this process: its outputs are checked)
def test_reward_model_export_ranks_held_out_pairs_in_transformers(tmp_path):
    """The embedded default (`persimmon-train reward`, fp32), then its export in transformers."""
    transformers = pytest.importorskip("transformers")
    from persimmon_train.data import Tokenizer, demo_assets

    out = tmp_path / "reward"
    default = ["trainer.precision=fp32", "export.dtype=fp32", "trainer.progress_bar=false"]
    run_recipe_here("reward", *default, "trainer.eval_every_n_steps=0", f"output_dir={out}", env=recipe_env(tmp_path))
    evals = _evals(out)
    assert evals[-1]["eval_accuracy"] >= 0.9 and evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.3, evals
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["PersimmonForSequenceClassification"] and config["num_labels"] == 1
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "final", dtype=torch.float32).eval()
    assets = demo_assets()
    tok = Tokenizer(assets.tokenizer_path)
    bos = tok.bos_id != tok.eos_id

    def score(prompt, response):
        ids, _ = tok.encode_chat([(prompt, response)], bos=bos)
        with torch.no_grad():
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])

    with open(assets.preference_eval_files[0], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]  # all 200 held-out pairs
    right = sum(score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"]) for r in rows)
    assert right / len(rows) >= 0.9, right


RESUME = [
    *FAST,
    "peft=none",
    "data.seq_len=128",
    "trainer.max_steps=12",
    "checkpoint.every_n_steps=3",
    "checkpoint.keep_last=2",
    "trainer.eval_every_n_steps=0",
    "trainer.eval_at_start=false",
    "trainer.eval_max_batches=1",
    "trainer.micro_batch_size=4",
    "optim.lr=1e-3",
]


@pytest.mark.slow
def test_full_ft_dpo_resumes_exactly_after_sigkill(tmp_path):
    """Full fine-tuning: the reference is stored before training; a resumed run reads it back (never
    the resumed weights), so its losses and final weights equal an uninterrupted run's."""
    from persimmon_train.data import demo_assets

    env = recipe_env(tmp_path)
    pairs = tmp_path / "pairs.jsonl"  # 200 demo pairs: the reference pass reads every row once
    with open(demo_assets().preference_train_files[0], encoding="utf-8") as f:
        pairs.write_text("".join(f.readlines()[:200]))
    args = [*RESUME, f"data.train_files=[{pairs}]"]
    reference = tmp_path / "reference"
    proc = run_recipe("dpo", *args, f"output_dir={reference}", env=env)
    assert "reference: log-probs of the initial weights, stored" in proc.stderr

    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, str(REPO / "recipes" / "dpo.py"), *args, f"output_dir={killed}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(killed / "checkpoints" / "step_3", child, timeout=240, poll=0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL and not (killed / "final").exists()

    proc = run_recipe("dpo", *args, f"output_dir={killed}", "resume=latest", env=env)
    assert "reference_logps" in proc.stderr and "stored " in proc.stderr  # read back, not recomputed
    ours, theirs = (
        load_file(str(killed / "final" / "model.safetensors")),
        load_file(str(reference / "final" / "model.safetensors")),
    )
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    losses = lambda d: [(r["step"], r["loss"], r["rewards/margins"]) for r in read_metrics(d) if "loss" in r]  # noqa: E731
    assert losses(killed) == losses(reference)
