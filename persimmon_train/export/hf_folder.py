"""Write a plain Hugging Face model folder from a stream of tensors -- the one way this project does it.

Used by `recipes/export.py` (streaming from a checkpoint) and by training's own end-of-run export
(`output_dir/final/`). The folder is built in `<out>.tmp` and renamed into place only once every
file is there and the tensor names and shapes match the model class, so `<out>` is always either
absent, the previous export, or a complete new one.
"""

from __future__ import annotations

from typing import Iterable

import torch

from persimmon_train.errors import WeightsError
from persimmon_train.export.safetensors_stream import ShardWriter, staged_folder

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def export_dtype(name: str, key: str = "dtype") -> torch.dtype:
    from persimmon_train.errors import ConfigError

    if name not in DTYPES:
        raise ConfigError(f"{key}: {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def write_model_config(folder: str, model_class: type, config) -> None:
    """config.json (architectures = our class name, labels for heads) + generation_config.json (causal LM)."""
    config.save_pretrained(folder, architectures=[model_class.__name__])
    if model_class.__name__ == "PersimmonForCausalLM":
        config.save_generation_config(folder)


def write_hf_folder(out_dir: str, tensors: Iterable[tuple[str, torch.Tensor]], *, model_class: type, config,
                    tokenizer, dtype: torch.dtype, max_shard_size: int | str = "5GB") -> list[str]:
    """Stream `tensors` (HF names) into `out_dir` as safetensors shards + config + tokenizer.

    Each tensor is cast to `dtype` as it arrives and dropped once its shard is written, so host
    memory holds about one shard. Returns the weight file names.
    """
    with torch.device("meta"):
        shell = model_class(config)
    expected = {name: tuple(t.shape) for name, t in shell.state_dict().items()}
    with staged_folder(out_dir) as tmp:
        writer = ShardWriter(tmp, max_shard_size)
        for name, tensor in tensors:
            if name not in expected:
                raise WeightsError(f"export: tensor {name} is not a weight of {model_class.__name__}")
            if tuple(tensor.shape) != expected[name]:
                raise WeightsError(f"export: tensor {name} has shape {list(tensor.shape)} but "
                                   f"{model_class.__name__} expects {list(expected[name])}")
            writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
            del tensor
        missing = sorted(set(expected) - writer.names)
        if missing:
            raise WeightsError(f"export: {len(missing)} weights of {model_class.__name__} were not produced, "
                               f"e.g. {missing[:5]}")
        files = writer.close()
        write_model_config(tmp, model_class, config)
        tokenizer.save_pretrained(tmp)
    return files
