"""A signal mid-run (single process, in-process): checkpoint, exit code 3, no export; resume=auto
then ends bit-identical to an uninterrupted run. The signal arrives while a checkpoint is being
written: that write finishes and validates, and the run stops at that step boundary (the flag is
read after the periodic checkpoint), with no second write of the same step."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from persimmon_train import cli
from persimmon_train.recipes.main import main as command
from persimmon_train.storage import validate_checkpoint
from persimmon_train.training import checkpointing, preemption
from tests.helpers import FAST, read_metrics

# LoRA with dropout: the restored RNG state matters.
COMMON = [
    *FAST,
    "peft=lora",
    "peft.dropout=0.1",
    "model.hidden_dropout=0.1",
    "trainer.max_steps=6",
    "checkpoint.every_n_steps=2",
    "checkpoint.keep_last=0",
    "trainer.eval_every_n_steps=0",
    "trainer.eval_at_start=false",
    "trainer.eval_max_batches=1",
    "trainer.num_threads=1",
]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for number, handler in handlers.items():  # exit 3 leaves SIGTERM/SIGUSR1 ignored until the exit
        signal.signal(number, handler)


def _run(*argv) -> int:
    try:
        command(["finetune", *argv])
    except SystemExit as exc:
        return exc.code
    return 0


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def test_sigusr1_during_a_checkpoint_write_stops_at_that_step_then_resume_auto_is_bit_identical(
    tmp_path, env, monkeypatch
):
    reference = tmp_path / "reference"
    assert _run(*COMMON, f"output_dir={reference}") == 0

    stopped = tmp_path / "stopped"
    real_save = checkpointing.save_run_checkpoint
    during_write = {}

    def save_and_get_signalled(output_dir, step, **kwargs):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # handled at the next bytecode, mid-write
            time.sleep(0.01)
            during_write["flag"] = trainer_flag()
        return real_save(output_dir, step, **kwargs)

    flags = []
    real_install = preemption.StopFlag.install

    def install(self):
        flags.append(self)
        return real_install(self)

    def trainer_flag():
        return flags[-1].received

    monkeypatch.setattr(checkpointing, "save_run_checkpoint", save_and_get_signalled)
    monkeypatch.setattr(preemption.StopFlag, "install", install)
    assert _run(*COMMON, f"output_dir={stopped}") == cli.EXIT_STOPPED_EARLY == 3
    # The process only exits now: a launcher passing signals on must not turn exit 3 into a kill.
    assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    assert during_write["flag"] == "SIGUSR1"  # the signal really arrived inside the write
    checkpoints = stopped / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2"]
    validate_checkpoint(str(checkpoints / "step_2"))  # the write the signal interrupted finished
    assert max(step for step, _ in _losses(stopped)) == 2
    assert not (stopped / "final").exists()  # not finished: no export
    log = (stopped / "train.log").read_text()
    line = next(x for x in log.splitlines() if "stopping after step" in x)
    assert "SIGUSR1" in line and "step 2 of 6" in line and str(checkpoints / "step_2") in line
    assert json.loads((stopped / preemption.RESTARTS_FILE).read_text())["ended"]["reason"] == "SIGUSR1"

    monkeypatch.setattr(checkpointing, "save_run_checkpoint", real_save)
    torch.manual_seed(4321)  # a restarted process starts from another RNG state
    assert _run(*COMMON, f"output_dir={stopped}", "resume=auto") == 0
    ours = load_file(str(stopped / "final" / "model.safetensors"))
    theirs = load_file(str(reference / "final" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert _losses(stopped) == _losses(reference)


def test_time_budget_stops_like_a_signal(tmp_path, env):
    out = tmp_path / "budget"
    # A budget shorter than the setup: the run stops after its first step.
    assert _run(*COMMON, f"output_dir={out}", "trainer.max_minutes=0.0001") == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]
    assert json.loads((out / preemption.RESTARTS_FILE).read_text())["ended"]["reason"] == "trainer.max_minutes"
    assert not (out / "final").exists()
