"""checkpoint.async_save (strategy=fsdp, one rank, in-process): the files equal a synchronous
save's byte for byte (DCP's .metadata but for the folder and save id it records); training goes on
while a checkpoint is written, and until its manifest is there the previous checkpoint is the
newest that validates (what a kill mid-write would leave)."""

from __future__ import annotations

import threading
import time

import pytest

from persimmon_train.parallel.fsdp import FSDPStrategy
from persimmon_train.recipes.main import main as command
from persimmon_train.storage import checkpoints as store
from tests.helpers import FAST, read_metrics

COMMON = [
    *FAST,
    "strategy=fsdp",
    "peft=none",
    "trainer.max_steps=6",
    "checkpoint.every_n_steps=2",
    "checkpoint.keep_last=0",
    "trainer.eval_every_n_steps=0",
    "trainer.eval_at_start=false",
    "trainer.eval_max_batches=1",
    "trainer.num_threads=1",
    "export.enabled=false",
]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", str(tmp_path / "cache"))
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


def _files(step_dir):
    """Every file's bytes; DCP's .metadata without its storage_meta (the folder it was written to and
    a random save id: it differs between any two saves)."""
    from torch.distributed.checkpoint import FileSystemReader

    manifest = store.validate_checkpoint(str(step_dir))
    files = {name: (step_dir / name).read_bytes() for name in manifest["files"]}
    metadata = FileSystemReader(str(step_dir / "dcp")).read_metadata()
    metadata.storage_meta = None
    files["dcp/.metadata"] = repr(vars(metadata)).encode()
    return files


def test_async_files_equal_sync_and_training_goes_on_while_the_previous_checkpoint_stays_newest(
    tmp_path, env, monkeypatch
):
    sync, background = tmp_path / "sync", tmp_path / "async"
    command(["finetune", *COMMON, f"output_dir={sync}"])

    real = FSDPStrategy.save_staged
    seen = {}

    def slow_write(self, staged, directory, comm):
        if directory.endswith("step_4.tmp"):
            assert threading.current_thread() is not threading.main_thread()
            deadline = time.monotonic() + 30
            while not any(r["step"] == 5 for r in _rows(background)) and time.monotonic() < deadline:
                time.sleep(0.02)  # training goes on while this checkpoint is being written
            seen["steps_meanwhile"] = max(r["step"] for r in _rows(background))
            seen["newest_valid"] = store.choose_resume("auto", str(background))[0]
            seen["listed"] = sorted(p.name for p in (background / "checkpoints").iterdir())
        real(self, staged, directory, comm)

    monkeypatch.setattr(FSDPStrategy, "save_staged", slow_write)
    command(["finetune", *COMMON, f"output_dir={background}", "checkpoint.async_save=true"])
    assert seen["steps_meanwhile"] >= 5
    assert seen["newest_valid"] == str(background / "checkpoints" / "step_2")  # a kill now resumes from step_2
    assert seen["listed"] == ["step_2", "step_4.tmp"]
    for step in (2, 4, 6):
        name = f"step_{step}"
        ours, theirs = _files(background / "checkpoints" / name), _files(sync / "checkpoints" / name)
        assert ours.keys() == theirs.keys()
        for file in ours:
            assert ours[file] == theirs[file], f"{name}/{file}"
    assert _losses(background) == _losses(sync)


def _rows(run_dir):
    try:
        return [r for r in read_metrics(run_dir) if "loss" in r]
    except FileNotFoundError:
        return []


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in _rows(run_dir)]


def test_deepspeed_async_is_refused_in_one_line():
    from persimmon_train import cli
    from persimmon_train.errors import ConfigError

    with pytest.raises(ConfigError, match="checkpoint.async_save: only strategy=fsdp"):
        cli.load_config("finetune", ["strategy=deepspeed", "strategy.stage=2", "checkpoint.async_save=true"])
