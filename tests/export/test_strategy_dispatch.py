"""Checkpoints name their strategy in strategy.json; export asks that strategy's module for the weights."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import torch

from persimmon_train.errors import WeightsError
from persimmon_train.export import export_checkpoint
from persimmon_train.export.safetensors_stream import iter_weights_folder
from tests.export.conftest import checkpoint_of, load_tensors


@pytest.fixture
def cache_env(monkeypatch, export_env):
    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", export_env["PERSIMMON_TRAIN_CACHE"])


def _as_strategy_checkpoint(run, tmp_path, name: str):
    """A copy of the run whose step folder says `strategy.json: {name}` and holds no model.safetensors."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("final", "adapter"))
    step = checkpoint_of(copy)
    (step / "model.safetensors").rename(tmp_path / "consolidated.safetensors")
    (step / "strategy.json").write_text(json.dumps({"name": name, "world_size": 2}))
    return step


def test_sharded_strategy_weights_come_from_its_module(lora_run, tmp_path, monkeypatch, cache_env):
    step = _as_strategy_checkpoint(lora_run, tmp_path, "fsdp")
    calls = []

    def iter_checkpoint_weights(checkpoint_dir):
        calls.append(checkpoint_dir)
        consolidated = tmp_path / "shards"
        consolidated.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "consolidated.safetensors", consolidated / "model.safetensors")
        yield from iter_weights_folder(str(consolidated))

    fake = types.ModuleType("persimmon_train.parallel.fsdp")
    fake.iter_checkpoint_weights = iter_checkpoint_weights
    monkeypatch.setitem(sys.modules, "persimmon_train.parallel.fsdp", fake)
    result = export_checkpoint(str(step), str(tmp_path / "out"), dtype="fp32")
    assert result.strategy == "fsdp" and calls == [str(step)]
    exported, final = load_tensors(tmp_path / "out"), load_tensors(lora_run / "final")
    assert sorted(exported) == sorted(final)
    assert all(torch.equal(exported[k], final[k]) for k in final)


def test_unknown_strategy_names_the_missing_module(lora_run, tmp_path, cache_env):
    step = _as_strategy_checkpoint(lora_run, tmp_path, "zero9")
    with pytest.raises(WeightsError, match=r"export from zero9 checkpoints needs persimmon_train\.parallel\.zero9"):
        export_checkpoint(str(step), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
