"""Checkpoints: Hugging Face safetensors weights in and out (more converters live beside it)."""

from persimmon_train.checkpoint.hf_weights import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    iter_safetensors,
    load_safetensors_into,
    parse_size,
    read_weight_map,
    save_safetensors,
)

__all__ = [
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "iter_safetensors",
    "load_safetensors_into",
    "parse_size",
    "read_weight_map",
    "save_safetensors",
]
