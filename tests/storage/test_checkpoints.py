"""Training checkpoints on disk (storage/checkpoints.py), without a model: the manifest, validation,
what to resume, and failed writes."""

from __future__ import annotations

import errno
import json
import os
import re
import zlib

import pytest

from persimmon_train.errors import CheckpointError, StorageError
from persimmon_train.storage import checkpoints as store
from persimmon_train.storage.checkpoints import LocalComm


def _save(root, step, payload: bytes = b"weights", **kw):
    def write_files(folder):
        with open(os.path.join(folder, "model.bin"), "wb") as f:
            f.write(payload)
        os.makedirs(os.path.join(folder, "sub"))
        with open(os.path.join(folder, "sub", "part.bin"), "wb") as f:
            f.write(payload * 2)

    return store.save_checkpoint(
        str(root), step, comm=LocalComm(), write_files=write_files, metadata={"strategy": {"name": "single"}}, **kw
    )


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    path = _save(tmp_path, 3)
    manifest = json.loads((tmp_path / "checkpoints" / "step_3" / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["strategy"] == {"name": "single"}
    assert manifest["files"] == {
        "model.bin": {"size": 7, "crc32": f"{zlib.crc32(b'weights'):08x}"},  # independent: zlib itself
        "sub/part.bin": {"size": 14, "crc32": f"{zlib.crc32(b'weightsweights'):08x}"},
    }
    assert store.validate_checkpoint(path) == manifest


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: os.remove(f"{p}/sub/part.bin"), "sub/part.bin is missing"),
        (lambda p: open(f"{p}/model.bin", "wb").write(b"weight"), "model.bin has 6 bytes, the manifest says 7"),
        (lambda p: open(f"{p}/model.bin", "wb").write(b"WEIGHTS"), "model.bin does not match its checksum"),
        (lambda p: os.remove(f"{p}/manifest.json"), "manifest.json is missing"),
        (lambda p: open(f"{p}/manifest.json", "w").write("{"), "manifest.json is unreadable"),
    ],
)
def test_damage_is_named_and_latest_falls_back(tmp_path, damage, message, caplog):
    older, newer = _save(tmp_path, 2), _save(tmp_path, 4)
    damage(newer)
    with pytest.raises(CheckpointError, match=message):
        store.validate_checkpoint(newer)
    with pytest.raises(CheckpointError, match=message):
        store.choose_resume(newer, str(tmp_path))
    with caplog.at_level("WARNING", logger="persimmon_train"):
        assert store.choose_resume("latest", str(tmp_path))[0] == older
    assert "skipping damaged checkpoint step_4" in caplog.text


def test_latest_with_no_checkpoint_starts_fresh(tmp_path):
    assert store.choose_resume("latest", str(tmp_path)) is None
    os.makedirs(tmp_path / "checkpoints" / "step_3.tmp")  # a killed run's unfinished write is no checkpoint
    assert store.choose_resume("latest", str(tmp_path)) is None
    assert store.choose_resume(None, str(tmp_path)) is None


def test_latest_with_every_checkpoint_damaged_names_each_and_keeps_them(tmp_path):
    """Starting fresh would overwrite them (and metrics.jsonl): refuse, naming each one and why."""
    first, second = _save(tmp_path, 1), _save(tmp_path, 2)
    os.remove(f"{first}/manifest.json")
    open(f"{second}/model.bin", "wb").write(b"WEIGHTS")
    before = sorted(os.walk(tmp_path))
    with pytest.raises(CheckpointError) as caught:
        store.choose_resume("latest", str(tmp_path))
    message = str(caught.value)
    assert "step_2: " in message and "model.bin does not match its checksum" in message
    assert "step_1: " in message and "manifest.json is missing" in message
    assert "overwrite=true" in message and "\n" not in message
    assert sorted(os.walk(tmp_path)) == before
    with pytest.raises(CheckpointError, match="every checkpoint of .* is damaged .*step_2: .*step_1: "):
        store.find_checkpoint(str(tmp_path))  # export of a run folder: the same reasons


def test_step_order_is_numeric_for_resume_and_pruning(tmp_path):
    """step_10 is newer than step_9 (as text it sorts first): resume=latest takes it, keep_last keeps it."""
    for step in (9, 10):
        _save(tmp_path, step)
    assert [s for s, _ in store.list_step_dirs(str(tmp_path))] == [9, 10]
    assert store.choose_resume("latest", str(tmp_path))[0] == str(tmp_path / "checkpoints" / "step_10")
    _save(tmp_path, 11, keep_last=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_10", "step_11"]


def test_keep_last_across_a_digit_boundary_keeps_the_newest(tmp_path):
    _save(tmp_path, 9)
    _save(tmp_path, 10, keep_last=1)
    assert os.listdir(tmp_path / "checkpoints") == ["step_10"]


def test_keep_last_prunes_older_checkpoints(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in store.list_step_dirs(str(tmp_path))] == [2, 3]


def test_a_full_disk_is_one_line_and_keeps_earlier_checkpoints(tmp_path):
    earlier = _save(tmp_path, 1)

    def full_disk(folder):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, "optimizer.pt"))

    with pytest.raises(
        StorageError,
        match=r"checkpoint step_2 not written: writing .*step_2\.tmp/optimizer\.pt: "
        r"the disk is full \[errno 28\]; earlier checkpoints are intact",
    ):
        store.save_checkpoint(str(tmp_path), 2, comm=LocalComm(), write_files=full_disk, metadata={})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_1"]
    store.validate_checkpoint(earlier)


TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3988"


@pytest.mark.parametrize(
    "free, wording",
    [(1 << 20, r"the disk is full \(1 MiB free"), (50 << 30, r"the write stopped short \(50\.0 GiB free there")],
)
def test_torch_save_on_a_full_disk_names_the_file(tmp_path, monkeypatch, free, wording):
    """torch.save reports a short write as its own RuntimeError (no path, no errno): name the file."""
    import shutil

    import torch

    earlier = _save(tmp_path, 1)

    def short_write(obj, path, *args, **kwargs):
        open(path, "wb").write(b"x" * 100)
        raise RuntimeError(TORCH_SHORT_WRITE)

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))
    with pytest.raises(StorageError) as caught:
        store.save_checkpoint(
            str(tmp_path),
            2,
            comm=LocalComm(),
            write_files=lambda folder: store.save_trainer_state(folder, 0, {"step": 2}),
            metadata={},
        )
    message = str(caught.value)
    assert re.search(r"checkpoint step_2 not written: writing \S*/step_2\.tmp/trainer_state\.pt: " + wording, message)
    assert message.endswith("earlier checkpoints are intact") and "\n" not in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_1"]
    store.validate_checkpoint(earlier)


def test_torch_short_write_outside_disk_errors_names_the_folder(tmp_path, monkeypatch):
    """A strategy's own writer (no disk_errors around it): the message names the checkpoint folder."""
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=0))

    def write_files(folder):
        raise RuntimeError(TORCH_SHORT_WRITE)

    with pytest.raises(StorageError, match=r"writing \S*/step_4\.tmp: the disk is full \(0 MiB free"):
        store.save_checkpoint(str(tmp_path), 4, comm=LocalComm(), write_files=write_files, metadata={})


def test_a_bug_keeps_its_own_exception_and_cleans_up(tmp_path):
    def bug(folder):
        raise ValueError("a bug, not a user mistake")

    with pytest.raises(ValueError, match="a bug"):
        store.save_checkpoint(str(tmp_path), 5, comm=LocalComm(), write_files=bug, metadata={})
    assert os.listdir(tmp_path / "checkpoints") == []
