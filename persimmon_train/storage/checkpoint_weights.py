"""Full weights out of any strategy's training checkpoint, one tensor at a time, in one process.

Whatever wrote the checkpoint (its manifest names the strategy), the weights come out as
(name, FULL tensor) pairs under the unwrapped model's names: the trainable weights only (the whole
model for full fine-tuning; the LoRA adapter + trained heads, with peft's `base_model.model.`
prefixes, for LoRA). No torch.distributed process group is needed:
- single: `model.safetensors`, streamed;
- fsdp: DCP metadata, then one key at a time into a freshly allocated full tensor;
- deepspeed (ZeRO 1-3): storage.zero_checkpoint, each tensor assembled from the memory-mapped
  partitions when asked (tests check it against DeepSpeed's zero_to_fp32).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch

from persimmon_train.errors import CheckpointError
from persimmon_train.storage.checkpoints import (
    DCP_DIR,
    DCP_MODEL_KEY,
    DEEPSPEED_TAG,
    SINGLE_MODEL_FILE,
    read_manifest,
)
from persimmon_train.storage.safetensors_io import iter_safetensors_file
from persimmon_train.storage.zero_checkpoint import ZeroCheckpoint

Weights = Iterator[tuple[str, torch.Tensor]]


def _single(path: str) -> Weights:
    file = os.path.join(path, SINGLE_MODEL_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no {SINGLE_MODEL_FILE}; not a strategy=single checkpoint")
    yield from iter_safetensors_file(file)


def _fsdp(path: str) -> Weights:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = os.path.join(path, DCP_DIR)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path}: no {DCP_DIR}/ folder; not a strategy=fsdp checkpoint")
    metadata = dcp.FileSystemReader(folder).read_metadata()
    prefix = DCP_MODEL_KEY + "."
    for key, entry in metadata.state_dict_metadata.items():
        if not key.startswith(prefix) or not isinstance(entry, TensorStorageMetadata):
            continue
        name = key[len(prefix) :]
        tensor = torch.empty(entry.size, dtype=entry.properties.dtype)
        dcp.load({DCP_MODEL_KEY: {name: tensor}}, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
        yield name, tensor


def _deepspeed(path: str) -> Weights:
    if not os.path.isdir(os.path.join(path, DEEPSPEED_TAG)):
        raise CheckpointError(f"{path}: no {DEEPSPEED_TAG}/ folder; not a strategy=deepspeed checkpoint")
    yield from ZeroCheckpoint(os.path.join(path, DEEPSPEED_TAG))


READERS: dict[str, Callable[[str], Weights]] = {"single": _single, "fsdp": _fsdp, "deepspeed": _deepspeed}


def iter_checkpoint_weights(path: str, manifest: dict | None = None) -> Weights:
    """(name, full tensor) for a checkpoint's trainable weights, by the strategy its manifest names."""
    manifest = manifest if manifest is not None else read_manifest(path)
    name = (manifest.get("strategy") or {}).get("name")
    if name not in READERS:
        raise CheckpointError(
            f"{os.path.join(path, 'manifest.json')}: strategy {name!r} has no weights reader "
            f"(known: {', '.join(READERS)})"
        )
    return READERS[name](path)
