"""LoRA through `peft`: apply to our model, the merge arithmetic, peft's saved names and settings.

Our model is a plain nn.Module with HF parameter names, so peft's `get_peft_model` works on it
given explicit `target_modules`. The merge works one weight at a time (`merge_lora_weight`), so
export can stream a checkpoint of any size through it (persimmon_train/export/merge.py).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"


def strip_peft_prefix(name: str) -> str:
    """A peft-wrapped model's parameter name without peft's `base_model.model.` prefix."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def lora_config(cfg, task: str):
    """A peft LoraConfig from our PeftConfig; classification heads are trained in full."""
    with torchao_quiet():  # peft imports torchao (when installed) on import
        from peft import LoraConfig

    modules_to_save = list(cfg.modules_to_save)
    if task != "causal_lm" and "score" not in modules_to_save:
        modules_to_save.append("score")
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=modules_to_save or None,
        use_rslora=cfg.use_rslora,
        bias="none",
    )


@contextlib.contextmanager
def torchao_quiet():
    """Silence torchao's import-time warnings while the block runs.

    peft imports torchao, when it is installed, as it dispatches LoRA layers, and QLoRA uses its NF4
    (parallel/nf4.py). Importing torchao logs a warning per compiled extension its build cannot load
    on this machine (CUDA kernels on a CPU host, no triton), and torch logs deprecations of the
    pytree registrations of torchao's modules as they load: none concern LoRA or NF4, so they are
    kept off every run's console."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def apply_lora(model: nn.Module, cfg, task: str) -> nn.Module:
    """Wrap `model` with LoRA adapters; only adapter (and head) weights stay trainable."""
    from persimmon_train.errors import ConfigError

    with torchao_quiet():  # peft imports torchao (when installed) on import and while it wraps
        from peft import get_peft_model

    try:
        with torchao_quiet():
            return get_peft_model(model, lora_config(cfg, task))
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"peft.target_modules: {exc}".splitlines()[0]) from None


def lora_scale(cfg) -> float:
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)


def merge_lora_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, cfg) -> torch.Tensor:
    """W + scale * B @ A in float32 (peft's merge_and_unload), returned in W's dtype."""
    delta = (lora_b.float() @ lora_a.float()) * lora_scale(cfg)
    return (base.float() + delta).to(base.dtype)


def peft_saved_name(key: str) -> str:
    """Training name -> the name peft writes (and expects) in adapter_model.safetensors."""
    return (
        key.replace(f".modules_to_save.{ADAPTER_NAME}.", ".")
        .replace(f".lora_A.{ADAPTER_NAME}.", ".lora_A.")
        .replace(f".lora_B.{ADAPTER_NAME}.", ".lora_B.")
    )


def peft_settings(cfg) -> dict:
    """The LoRA settings a checkpoint manifest records (everything `lora_config` and the merge need)."""
    return {
        "method": "lora",
        "r": cfg.r,
        "alpha": cfg.alpha,
        "dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": list(cfg.target_modules),
        "modules_to_save": list(cfg.modules_to_save),
        "quantize_base": getattr(cfg, "quantize_base", "none"),  # QLoRA: the base the adapters trained over
    }
