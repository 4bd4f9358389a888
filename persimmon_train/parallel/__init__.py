"""Strategies: how a model is placed and stepped (single device now; FSDP2 / DeepSpeed later)."""

from persimmon_train.parallel.base import Strategy
from persimmon_train.parallel.single import SingleDeviceStrategy

STRATEGIES = {"single": SingleDeviceStrategy}


def build_strategy(name: str, **kwargs) -> Strategy:
    from persimmon_train.errors import ConfigError

    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name: {name!r} is not available; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](**kwargs)


__all__ = ["Strategy", "SingleDeviceStrategy", "STRATEGIES", "build_strategy"]
