"""SIGKILL a real run between checkpoints, resume it, and get bit-identical final weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import FAST, REPO, read_metrics, recipe_env, run_recipe, wait_for

pytestmark = pytest.mark.slow  # a real run SIGKILLed and resumed

# LoRA (adapter-only checkpoints over a seeded random base) with dropout on, so the restored RNG
# state matters; bigger batches so a step takes long enough to kill the run between checkpoints.
COMMON = [
    *FAST,
    "peft=lora",
    "peft.dropout=0.1",
    "model.hidden_dropout=0.1",
    "data.seq_len=128",
    "trainer.micro_batch_size=8",
    "trainer.grad_accum_steps=2",
    "trainer.max_steps=24",
    "checkpoint.every_n_steps=4",
    "checkpoint.keep_last=2",
    "trainer.eval_every_n_steps=0",
    "trainer.eval_at_start=false",
    "trainer.eval_max_batches=2",
    "optim.lr=3e-3",
]


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    env = recipe_env(tmp_path)
    reference = tmp_path / "reference"
    run_recipe("finetune", *COMMON, f"output_dir={reference}", env=env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "recipes" / "finetune.py"), *COMMON, f"output_dir={killed}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(killed / "checkpoints" / "step_4", proc, timeout=240, poll=0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    steps = sorted(int(p.name.split("_")[1]) for p in (killed / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    assert steps and steps[-1] < 24

    run_recipe("finetune", *COMMON, f"output_dir={killed}", "resume=latest", env=env)
    ours, theirs = _weights(killed), _weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    # The resumed run's log of losses continues exactly where the uninterrupted one went.
    losses = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if "loss" in r]  # noqa: E731
    assert losses(killed) == losses(reference)
