"""Strategies: how a model is placed and stepped -- single device, FSDP2, DeepSpeed ZeRO.

The distributed strategies are imported on first use (DeepSpeed takes seconds to import and
probes accelerators), so `single` runs never pay for them.
"""

from __future__ import annotations

import importlib

from persimmon_train.parallel.base import Strategy
from persimmon_train.parallel.single import SingleDeviceStrategy

# name -> (module, class). Reading weights back out of their checkpoints: persimmon_train.storage.
STRATEGIES = {
    "single": ("persimmon_train.parallel.single", "SingleDeviceStrategy"),
    "fsdp": ("persimmon_train.parallel.fsdp", "FSDPStrategy"),
    "deepspeed": ("persimmon_train.parallel.deepspeed", "DeepSpeedStrategy"),
}


def strategy_class(name: str) -> type[Strategy]:
    from persimmon_train.errors import ConfigError

    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name: {name!r} is not available; known: {', '.join(STRATEGIES)}")
    module, cls = STRATEGIES[name]
    return getattr(importlib.import_module(module), cls)


def build_strategy(name: str, **kwargs) -> Strategy:
    return strategy_class(name)(**kwargs)


def build_strategy_from_config(cfg) -> Strategy:
    """The strategy a RunConfig asks for (strategy.name); joins the process group if distributed."""
    return strategy_class(cfg.strategy.name).from_run_config(cfg)


__all__ = [
    "Strategy",
    "SingleDeviceStrategy",
    "STRATEGIES",
    "build_strategy",
    "build_strategy_from_config",
    "strategy_class",
]
