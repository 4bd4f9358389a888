"""LoRA through `peft`: apply to our model, merge into plain weights, save in PEFT format.

Our model is a plain nn.Module with HF parameter names, so peft's `get_peft_model` works on it
given explicit `target_modules`. The merge for export is done on a state dict (not the live
module) so it also works on the full state dict a sharded strategy gathers onto rank 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"


def lora_config(cfg, task: str):
    """A peft LoraConfig from our PeftConfig; classification heads are trained in full."""
    from peft import LoraConfig

    modules_to_save = list(cfg.modules_to_save)
    if task != "causal_lm" and "score" not in modules_to_save:
        modules_to_save.append("score")
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), modules_to_save=modules_to_save or None,
                      use_rslora=cfg.use_rslora, bias="none")


def apply_lora(model: nn.Module, cfg, task: str) -> nn.Module:
    """Wrap `model` with LoRA adapters; only adapter (and head) weights stay trainable."""
    from peft import get_peft_model

    from persimmon_train.errors import ConfigError

    try:
        return get_peft_model(model, lora_config(cfg, task))
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"peft.target_modules: {exc}".splitlines()[0]) from None


def lora_scale(cfg) -> float:
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Fold LoRA deltas into the base weights; return plain HF names (no peft prefixes).

    W' = W + scale * B @ A for every `<module>.base_layer.weight` with `lora_A`/`lora_B`;
    `modules_to_save` copies replace their originals. Matches peft's `merge_and_unload`.
    """
    scale = lora_scale(cfg)
    merged: dict[str, torch.Tensor] = {}
    lora_a, lora_b, saved = {}, {}, {}
    for key, value in state_dict.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if f".lora_A.{ADAPTER_NAME}." in name:
            lora_a[name.replace(f".lora_A.{ADAPTER_NAME}.", ".")] = value
        elif f".lora_B.{ADAPTER_NAME}." in name:
            lora_b[name.replace(f".lora_B.{ADAPTER_NAME}.", ".")] = value
        elif f".modules_to_save.{ADAPTER_NAME}." in name:
            saved[name.replace(f".modules_to_save.{ADAPTER_NAME}.", ".")] = value
        elif ".original_module." in name:
            merged.setdefault(name.replace(".original_module.", "."), value)
        else:
            merged[name.replace(".base_layer.", ".")] = value
    for name, a in lora_a.items():  # name: "<module>.weight"
        base = merged[name]
        delta = (lora_b[name].float() @ a.float()) * scale
        merged[name] = (base.float() + delta).to(base.dtype)
    merged.update(saved)
    return merged


def peft_saved_name(key: str) -> str:
    """Training name -> the name peft writes (and expects) in adapter_model.safetensors."""
    return (key.replace(f".modules_to_save.{ADAPTER_NAME}.", ".")
               .replace(f".lora_A.{ADAPTER_NAME}.", ".lora_A.")
               .replace(f".lora_B.{ADAPTER_NAME}.", ".lora_B."))


def peft_settings(cfg) -> dict:
    """The LoRA settings a checkpoint manifest records (everything `lora_config` and the merge need)."""
    return {"method": "lora", "r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
            "target_modules": list(cfg.target_modules), "modules_to_save": list(cfg.modules_to_save)}
