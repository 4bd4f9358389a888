"""Hugging Face model folders and PEFT adapter folders: the one writer of each.

A model folder is config.json (+ generation_config.json for a causal LM), safetensors shards +
index, and the tokenizer; an adapter folder is adapter_config.json + adapter_model.safetensors
(+ the tokenizer). Both are built in a staging folder and moved into place (`staged_folder`), so
the destination only ever holds a complete write, and nothing else in it is touched.

Config and tokenizer objects are duck-typed (`save_pretrained(folder, ...)`): this layer knows no
model; callers (model.save_pretrained, ADEPT conversion, export) hand theirs in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping

import torch

from persimmon_train.errors import WeightsError
from persimmon_train.storage.files import check_output_folder, staged_folder
from persimmon_train.storage.safetensors_io import (
    ShardWriter,
    header_reserve,
    is_weight_file,
    write_safetensors_file,
)

log = logging.getLogger("persimmon_train")

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
_OWN_FILES = {CONFIG_NAME, GENERATION_CONFIG_NAME, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, *TOKENIZER_FILES}


def is_own_file(name: str) -> bool:
    """Files a model/adapter folder write produces (and so may replace on overwrite)."""
    return name in _OWN_FILES or is_weight_file(name)


def write_hf_folder(
    out_dir: str,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    architecture: str,
    config,
    tokenizer=None,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    key: str = "output_dir",
    progress_total: int | None = None,
) -> list[str]:
    """Stream `(name, tensor)` pairs (HF names) into `out_dir` as a model folder; returns the weight files.

    Each tensor is cast to `dtype` (floating tensors; None keeps it) as it arrives, written and
    dropped: host memory holds about one tensor (a `StoredTensor` streams from its source file in
    row blocks, cast on the way). `expected_shapes` (name -> shape):
    every tensor must be one of them with that shape, and all must arrive.
    """
    out_dir = check_output_folder(out_dir, key, overwrite)
    with staged_folder(out_dir, replaceable=is_own_file) as tmp:
        reserve = {} if expected_shapes is None else {"header_reserve": header_reserve(expected_shapes)}
        with ShardWriter(tmp, max_shard_size, **reserve) as writer:
            for name, tensor in _progress(tensors, progress_total, os.path.basename(out_dir)):
                if expected_shapes is not None:
                    if name not in expected_shapes:
                        raise WeightsError(f"tensor {name} is not a weight of {architecture}")
                    if tuple(tensor.shape) != tuple(expected_shapes[name]):
                        raise WeightsError(
                            f"tensor {name} has shape {list(tensor.shape)} but {architecture} "
                            f"expects {list(expected_shapes[name])}"
                        )
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                writer.add(name, tensor)
                del tensor
            if expected_shapes is not None:
                missing = sorted(set(expected_shapes) - writer.names)
                if missing:
                    raise WeightsError(
                        f"{len(missing)} weights of {architecture} were not produced, e.g. {missing[:5]}"
                    )
            files = writer.close()
        config.save_pretrained(tmp, architectures=[architecture])
        if architecture.endswith("ForCausalLM"):
            config.save_generation_config(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return files


def write_adapter_folder(
    out_dir: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    adapter_config,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    key: str = "output_dir",
) -> list[str]:
    """adapter_model.safetensors (names as peft saves them) + adapter_config.json; returns the files."""
    out_dir = check_output_folder(out_dir, key, overwrite)
    weights = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        weights[name] = (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
    with staged_folder(out_dir, replaceable=is_own_file) as tmp:
        write_safetensors_file(os.path.join(tmp, ADAPTER_WEIGHTS_NAME), weights)
        adapter_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = sorted(os.listdir(tmp))
    return files


def _progress(items, total: int | None, what: str):
    """A progress bar over the tensors when the logger speaks (rank 0) and the work is long."""
    if total is None or total < 64 or not log.isEnabledFor(logging.INFO):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=f"writing {what}", unit="tensor", leave=False)
