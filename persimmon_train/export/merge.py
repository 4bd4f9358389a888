"""The merged model as a stream: base weights + a checkpoint's trainable weights, one tensor at a time.

- Full fine-tuning checkpoints hold every weight: they pass straight through.
- LoRA checkpoints hold the adapter (small, read whole) and the heads (`modules_to_save`). Each
  base tensor is read, merged if the adapter has A/B for its module (`merge_lora_weight`: scale,
  rslora, float32 math, as peft's merge_and_unload) and handed on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from persimmon_train.adapters.lora import ADAPTER_NAME, merge_lora_weight, strip_peft_prefix
from persimmon_train.errors import WeightsError
from persimmon_train.storage import StoredTensor, materialize

log = logging.getLogger("persimmon_train")

_LORA_A = f".lora_A.{ADAPTER_NAME}."
_LORA_B = f".lora_B.{ADAPTER_NAME}."
_SAVED = f".modules_to_save.{ADAPTER_NAME}."


@dataclass
class LoraWeights:
    """A LoRA checkpoint's tensors, by the HF name of the base weight they act on."""

    a: dict[str, torch.Tensor] = field(default_factory=dict)  # "<module>.weight" -> lora_A
    b: dict[str, torch.Tensor] = field(default_factory=dict)
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save copies, plain names
    raw: dict[str, torch.Tensor] = field(default_factory=dict)  # as in the checkpoint, for the PEFT adapter


def is_lora_name(name: str) -> bool:
    return any(tag in name for tag in (_LORA_A, _LORA_B, _SAVED, ".lora_"))


def split_lora(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> LoraWeights:
    weights = LoraWeights()
    for key, value in tensors:
        weights.raw[key] = value
        name = strip_peft_prefix(key)
        if _LORA_A in name:
            weights.a[name.replace(_LORA_A, ".")] = value
        elif _LORA_B in name:
            weights.b[name.replace(_LORA_B, ".")] = value
        elif _SAVED in name:
            weights.saved[name.replace(_SAVED, ".")] = value
        else:
            # lora_embedding_A/B, DoRA magnitudes, other adapters: not what merge_lora_weight folds.
            raise WeightsError(
                f"{where}: tensor {key} is not a LoRA A/B matrix or a modules_to_save copy; "
                f"export merges plain LoRA on Linear layers only"
            )
    unpaired = sorted(set(weights.a) ^ set(weights.b))
    if unpaired:
        raise WeightsError(f"{where}: LoRA A and B do not pair up for {unpaired[:3]}")
    return weights


def merge_one(name: str, base: torch.Tensor | StoredTensor, lora: LoraWeights, peft_cfg) -> torch.Tensor:
    """W + scale * B @ A for one weight, in float32 (training held float32 master weights)."""
    return merge_lora_weight(materialize(base.float()), lora.a[name], lora.b[name], peft_cfg)


def iter_merged_lora(
    base: Iterable[tuple[str, torch.Tensor]], lora: LoraWeights, peft_cfg, expected: set[str], where: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Base weights with the LoRA deltas folded in and the heads replaced by the trained copies.

    Base tensors the exported head does not have (a causal LM's `lm_head` under a classifier) are
    skipped; heads missing from the base (a fresh `score`) come from the checkpoint.
    """
    merged: set[str] = set()
    for name, tensor in base:
        if name not in expected:
            log.info("export: base tensor %s is not part of the exported model; skipped", name)
            continue
        if name in lora.saved:
            continue  # the trained copy follows below
        if name in lora.a:
            tensor = merge_one(name, tensor, lora, peft_cfg)
            merged.add(name)
        else:
            # Training held float32 master weights; cast once, at the writer (a StoredTensor
            # only records the cast: the writer streams it from model.path block by block).
            tensor = tensor.float()
        yield name, tensor
    missing = sorted(set(lora.a) - merged)
    if missing:
        raise WeightsError(
            f"{where}: the adapter has LoRA weights for {missing[:3]}, which the base model does not have"
        )
    yield from lora.saved.items()


def iter_full(tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A full fine-tuning checkpoint: every weight is already there (names without peft prefixes)."""
    for key, value in tensors:
        if is_lora_name(key):
            raise WeightsError(f"{where}: tensor {key} is a LoRA weight, but the run's config says peft.method=none")
        yield strip_peft_prefix(key), value
