"""A checkpoint's manifest names the strategy that wrote it; export picks that strategy's weights reader."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from persimmon_train.errors import CheckpointError
from persimmon_train.export import export_checkpoint
from persimmon_train.storage import checkpoint_weights
from tests.export.conftest import checkpoint_of
from tests.helpers import load_tensors


def _renamed_strategy(run, tmp_path, name: str):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("final", "adapter"))
    step = checkpoint_of(copy)
    manifest = json.loads((step / "manifest.json").read_text())
    manifest["strategy"] = {"name": name, "world_size": 2}
    (step / "manifest.json").write_text(json.dumps(manifest))
    return step


def test_the_manifest_strategy_picks_the_reader(lora_run, tmp_path, monkeypatch):
    step = _renamed_strategy(lora_run, tmp_path, "fsdp")
    calls = []

    def fake_fsdp_reader(path):  # stands in for DCP: hands back the single checkpoint's tensors
        calls.append(path)
        yield from checkpoint_weights._single(path)

    monkeypatch.setitem(checkpoint_weights.READERS, "fsdp", fake_fsdp_reader)
    result = export_checkpoint(str(step), str(tmp_path / "out"), dtype="fp32")
    assert result.strategy == "fsdp" and calls == [str(step)]
    exported, final = load_tensors(tmp_path / "out"), load_tensors(lora_run / "final")
    assert sorted(exported) == sorted(final)
    assert all(torch.equal(exported[k], final[k]) for k in final)


def test_unknown_strategy_is_named(lora_run, tmp_path):
    step = _renamed_strategy(lora_run, tmp_path, "zero9")
    with pytest.raises(CheckpointError, match=r"strategy 'zero9' has no weights reader"):
        export_checkpoint(str(step), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
