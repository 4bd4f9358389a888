"""What a run owns in output_dir (training/run_folder.py): an earlier run is refused unless resumed
or started over, overwrite=true removes only the run's own files, and one run at a time holds the
folder's lock (released when its process dies, even by SIGKILL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from persimmon_train import cli
from persimmon_train.errors import ConfigError
from persimmon_train.training import run_folder
from tests.helpers import REPO

OURS = [
    "checkpoints/step_2/model.safetensors",
    "checkpoints/step_10/manifest.json",
    "checkpoints/step_12.tmp/optimizer.pt",
    "metrics.jsonl",
    "config.yaml",
    "train.log",
    "loss_curve.png",
    "final/config.json",
    "final/model.safetensors",
    "final/tokenizer.model",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
]
THEIRS = [
    "notes.txt",
    "checkpoints/README.md",
    "final/README.md",
    "wandb/offline-run-1/run-1.wandb",
    "eval_metrics.json",
]


def make_files(root: Path, names) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def cfg(resume=None, overwrite=False):
    return SimpleNamespace(resume=resume, overwrite=overwrite)


def test_an_earlier_run_is_refused_naming_its_checkpoints(tmp_path):
    make_files(tmp_path, OURS + THEIRS)
    before = {p: (tmp_path / p).read_text() for p in files(tmp_path)}
    with pytest.raises(ConfigError) as caught:
        run_folder.check_start(cfg(), str(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"output_dir: {tmp_path} already holds a run (checkpoints step_2, step_10; ")
    assert "metrics.jsonl, config.yaml, train.log, loss_curve.png, final/, adapter/" in message
    assert "resume=latest continues it" in message and "overwrite=true starts over" in message
    assert "step_12" not in message and "\n" not in message
    assert {p: (tmp_path / p).read_text() for p in files(tmp_path)} == before
    run_folder.check_start(cfg(resume="latest"), str(tmp_path))  # continuing it, or starting over: allowed
    run_folder.check_start(cfg(resume="/elsewhere/checkpoints/step_4"), str(tmp_path))
    run_folder.check_start(cfg(overwrite=True), str(tmp_path))


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "train.log", "final/model.safetensors"])
def test_a_run_without_checkpoints_is_an_earlier_run_too(tmp_path, leftover):
    make_files(tmp_path, [leftover])
    with pytest.raises(ConfigError, match=r"already holds a run \(no checkpoints; "):
        run_folder.check_start(cfg(), str(tmp_path))


def test_a_new_empty_or_foreign_folder_starts(tmp_path):
    run_folder.check_start(cfg(), str(tmp_path / "new"))
    run_folder.check_start(cfg(), str(tmp_path))
    make_files(tmp_path, THEIRS)
    run_folder.check_start(cfg(), str(tmp_path))


def test_many_checkpoints_are_named_briefly(tmp_path):
    make_files(tmp_path, [f"checkpoints/step_{s}/manifest.json" for s in range(1, 21)])
    named = r"checkpoints step_1, step_2, \.\.\. \(20 in all\), step_18, step_19, step_20\)"
    with pytest.raises(ConfigError, match=named):
        run_folder.check_start(cfg(), str(tmp_path))


def test_start_over_removes_only_the_runs_own_files(tmp_path):
    make_files(tmp_path, OURS + THEIRS)
    removed = run_folder.start_over(str(tmp_path))
    assert files(tmp_path) == set(THEIRS)
    assert not (tmp_path / "adapter").exists()  # emptied: gone; final/ keeps the user's README
    assert "checkpoints/step_2" in removed and "final/model.safetensors" in removed
    assert run_folder.earlier_run(str(tmp_path)) == ([], [])


def test_overwrite_with_resume_is_a_contradiction():
    with pytest.raises(ConfigError, match=r"overwrite: overwrite=true starts the run over, resume=latest continues"):
        cli.load_config("finetune", ["output_dir=/tmp/x", "resume=latest", "overwrite=true"])
    assert cli.load_config("finetune", ["output_dir=/tmp/x"]).overwrite is False
    assert cli.load_config("finetune", ["output_dir=/tmp/x", "overwrite=true"]).overwrite is True


def test_one_run_at_a_time_holds_the_lock(tmp_path):
    lock = run_folder.acquire(str(tmp_path))
    holder = f"pid {os.getpid()} on host {socket.gethostname()}"
    assert holder in run_folder.lock_holder(str(tmp_path))
    with pytest.raises(ConfigError, match=f"output_dir: {tmp_path} is in use by another run \\({holder}, started"):
        run_folder.acquire(str(tmp_path))
    with pytest.raises(ConfigError, match=f"is in use by another run \\({holder}"):
        run_folder.check_start(cfg(resume="latest"), str(tmp_path))  # before any compute, even to resume
    lock.release()
    lock.release()  # idempotent
    assert not (tmp_path / run_folder.LOCK_FILE).exists()
    assert run_folder.lock_holder(str(tmp_path)) is None
    run_folder.acquire(str(tmp_path)).release()


HOLDER = """
import sys, time
from persimmon_train.training import run_folder
lock = run_folder.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_the_lock_dies_with_its_process(tmp_path):
    """SIGKILL: no cleanup runs, the lock file stays, and the kernel releases the lock."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"pid {proc.pid} on host "):
            run_folder.acquire(str(tmp_path))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / run_folder.LOCK_FILE).exists()
    lock = run_folder.acquire(str(tmp_path))
    assert f'"pid": {os.getpid()}' in (tmp_path / run_folder.LOCK_FILE).read_text()
    lock.release()


class Rank:
    """A rank of a 2-rank run whose broadcast hands out what rank 0 decided."""

    def __init__(self, rank: int, decided=None):
        self.rank, self.is_main, self.decided, self.barriers = rank, rank == 0, decided, 0

    def broadcast_object(self, obj):
        if self.is_main:
            self.decided = obj
        return self.decided

    def barrier(self):
        self.barriers += 1


def test_every_rank_gets_rank_0s_decision(tmp_path):
    make_files(tmp_path, ["checkpoints/step_2/manifest.json"])
    rank0 = Rank(0)
    with pytest.raises(ConfigError, match="already holds a run") as on_rank0:
        run_folder.agree(rank0, lambda: run_folder.check_start(cfg(), str(tmp_path)))
    checked = []
    with pytest.raises(ConfigError) as on_rank1:
        run_folder.agree(Rank(1, rank0.decided), lambda: checked.append(1))
    assert str(on_rank1.value) == str(on_rank0.value) and checked == []  # rank 1 never looked itself


def test_lock_run_locks_on_rank_0_only_and_starts_over(tmp_path):
    make_files(tmp_path, OURS + THEIRS)
    rank0 = Rank(0)
    lock = run_folder.lock_run(str(tmp_path), rank0, overwrite=True)
    assert lock.held and files(tmp_path) == {*THEIRS, run_folder.LOCK_FILE}
    other = run_folder.lock_run(str(tmp_path), Rank(1, rank0.decided), overwrite=True)
    assert not other.held  # rank 1 took nothing (it would have been refused: rank 0 holds it)
    with pytest.raises(ConfigError, match="is in use by another run"):
        run_folder.lock_run(str(tmp_path), Rank(0), overwrite=False)
    lock.release()
    assert files(tmp_path) == set(THEIRS)


def test_a_file_system_without_flock_warns_and_runs_unlocked(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(run_folder.fcntl, "flock", no_flock)
    assert run_folder.lock_holder(str(tmp_path)) is None
    with caplog.at_level("WARNING", logger="persimmon_train"):
        lock = run_folder.acquire(str(tmp_path))
    assert not lock.held and "goes on unlocked" in caplog.text
    lock.release()


def test_train_holds_the_lock_while_it_trains_and_releases_it(monkeypatch, tmp_path):
    from persimmon_train.training.run import train
    from persimmon_train.training.trainer import Trainer
    from tests.helpers import FAST

    seen, real_fit = [], Trainer.fit

    def fit(self):
        seen.append(run_folder.lock_holder(self.output_dir))
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", fit)
    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    overrides = ["trainer.max_steps=1", "trainer.eval_at_start=false", "trainer.eval_max_batches=1"]
    cfg = cli.load_config("finetune", [*FAST, *overrides, "export.enabled=false", f"output_dir={out}"])
    train(cfg, "finetune")
    assert len(seen) == 1 and f"pid {os.getpid()} on host {socket.gethostname()}" in seen[0]
    assert not (out / run_folder.LOCK_FILE).exists()
    with pytest.raises(ConfigError, match="already holds a run"):  # the same command again
        train(cli.load_config("finetune", [*FAST, *overrides, "export.enabled=false", f"output_dir={out}"]), "finetune")
