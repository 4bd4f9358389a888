"""A training checkpoint as a source of weights: find it, read its run config, stream its tensors.

What a checkpoint holds depends on the strategy that wrote it, named by `strategy.json`
(`{"name": "fsdp" | "deepspeed", ...}`); a folder with `model.safetensors` and no
`strategy.json` is a single-process checkpoint. Whatever the strategy, the weights come out as
(name, FULL tensor) pairs under the names the single strategy saves: the trainable weights only
(the whole model for full fine-tuning; the LoRA adapter + heads, with peft's `base_model.model.`
prefixes, for LoRA). Sharded strategies provide `persimmon_train.parallel.<name>.iter_checkpoint_weights`,
which consolidates in one process without torch.distributed.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from persimmon_train.errors import ConfigError, WeightsError

STRATEGY_FILE = "strategy.json"
SINGLE_MODEL_FILE = "model.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
RUN_CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class Checkpoint:
    path: str
    strategy: str  # single | fsdp | deepspeed | ...


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in (STRATEGY_FILE, TRAINER_STATE_FILE))


def locate_checkpoint(path: str) -> Checkpoint:
    """`checkpoints/step_N`, or a run's output_dir (its newest complete checkpoint)."""
    from persimmon_train.training.checkpointing import list_checkpoints

    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint: {path} does not exist")
    if not is_checkpoint(path):
        found = list_checkpoints(path)
        if not found:
            raise ConfigError(f"checkpoint: {path} is not a training checkpoint (expected checkpoints/step_N "
                              f"with {TRAINER_STATE_FILE}, or a run folder that has such checkpoints)")
        path = found[-1][1]
    return Checkpoint(path=path, strategy=_strategy_name(path))


def _strategy_name(path: str) -> str:
    strategy_file = os.path.join(path, STRATEGY_FILE)
    if os.path.isfile(strategy_file):
        try:
            with open(strategy_file, encoding="utf-8") as f:
                name = json.load(f).get("name")
        except (OSError, ValueError, AttributeError) as exc:
            raise WeightsError(f"{strategy_file}: unreadable ({exc})") from None
        if not isinstance(name, str) or not name:
            raise WeightsError(f"{strategy_file}: no strategy \"name\"")
        return name
    if os.path.isfile(os.path.join(path, SINGLE_MODEL_FILE)):
        return "single"
    raise WeightsError(f"checkpoint {path}: no {STRATEGY_FILE} and no {SINGLE_MODEL_FILE}: cannot tell which "
                       f"strategy wrote it")


def iter_checkpoint_weights(checkpoint: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for the checkpoint's trainable weights, one at a time."""
    if checkpoint.strategy == "single":
        from persimmon_train.export.safetensors_stream import iter_weights_folder

        return iter_weights_folder(checkpoint.path)  # the folder holds exactly model.safetensors
    module_name = f"persimmon_train.parallel.{checkpoint.strategy}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise WeightsError(f"export from {checkpoint.strategy} checkpoints needs {module_name} "
                               f"(checkpoint {checkpoint.path}), which this install does not have") from None
        raise
    reader = getattr(module, "iter_checkpoint_weights", None)
    if reader is None:
        raise WeightsError(f"export from {checkpoint.strategy} checkpoints needs "
                           f"{module_name}.iter_checkpoint_weights (checkpoint {checkpoint.path})")
    return iter(reader(checkpoint.path))


def run_config_path(checkpoint: Checkpoint, override: str | None = None) -> str:
    """The run's resolved config: `output_dir/config.yaml`, two levels above checkpoints/step_N."""
    path = override or os.path.join(os.path.dirname(os.path.dirname(checkpoint.path)), RUN_CONFIG_FILE)
    if not os.path.isfile(path):
        key = "config" if override else "checkpoint"
        raise ConfigError(f"{key}: no run config at {path} (the run's output_dir/config.yaml; "
                          f"pass config=PATH if it moved)")
    return path


def load_run_config(path: str):
    """config.yaml -> RunConfig (the schema fills keys an older run did not write)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from persimmon_train.training.config import RunConfig, validate_run_config

    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
        return validate_run_config(OmegaConf.to_object(merged))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{path}: " + (f"key '{key}': " if key else "") + str(exc).splitlines()[0]) from None
