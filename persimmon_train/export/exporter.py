"""Checkpoint -> HF folder (merged) or PEFT adapter folder: what `persimmon-train export` and the end
of every training run (`export_run_outputs`: the last checkpoint -> final/ + adapter/) do.

Everything comes from the checkpoint itself (validated against its manifest first): the weights,
the model config and head, the peft settings, the tokenizer. The merge is a stream -- one base
tensor read, merged and written at a time -- so host memory stays near one shard at any model size
and no process group is needed. At the end of a run rank 0 reads the last checkpoint back from
disk after the process group is gone, so a run at any world size ends with no full gather onto one
rank (for Persimmon-8B that gather would be ~19-37 GB on one host and a long collective).
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from persimmon_train.errors import ConfigError
from persimmon_train.export.merge import iter_full, iter_merged_lora, split_lora
from persimmon_train.export.model_source import load_model_source

log = logging.getLogger("persimmon_train")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class ExportResult:
    output_dir: str
    checkpoint: str
    strategy: str
    kind: str  # "merged" | "full" | "adapter"
    model_class: str
    dtype: str
    files: list[str]


def export_dtype(name: str | None, key: str = "dtype") -> torch.dtype | None:
    if name in (None, "", "auto"):
        return None
    if name not in DTYPES:
        raise ConfigError(f"{key}: {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_not_inside(out_dir: str, checkpoint: str) -> None:
    out = os.path.abspath(out_dir)
    if out == checkpoint or checkpoint.startswith(out + os.sep) or out.startswith(checkpoint + os.sep):
        raise ConfigError(f"output_dir: {out} overlaps the checkpoint it exports ({checkpoint})")


def export_checkpoint(
    checkpoint: str,
    output_dir: str,
    *,
    dtype: str | None = "bf16",
    merge: bool = True,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    manifest: dict | None = None,
) -> ExportResult:
    """Export a training checkpoint (any strategy; full or LoRA; any head).

    merge=True: a plain HF model folder (LoRA folded into the base) with config, generation config,
    sharded safetensors + index, and the tokenizer; `dtype` bf16 | fp32 | auto (as trained).
    merge=False: the LoRA adapter alone, PEFT format, in the dtype it was trained in unless `dtype`
    says otherwise. A non-empty `output_dir` is refused unless `overwrite`, which replaces only the
    files the export writes. `manifest`: the checkpoint's, when the caller validated it already
    (the end of a run exports the same checkpoint twice: final/ and adapter/).
    """
    from persimmon_train.adapters import peft_saved_name
    from persimmon_train.storage import (
        check_output_folder,
        find_checkpoint,
        iter_checkpoint_weights,
        parse_size,
        validate_checkpoint,
        write_adapter_folder,
        write_hf_folder,
    )

    torch_dtype = export_dtype(dtype)
    parse_size(max_shard_size)  # a bad size fails before any work
    path, found = find_checkpoint(checkpoint)
    _check_not_inside(output_dir, path)
    check_output_folder(output_dir, "output_dir", overwrite)
    manifest = manifest or found or validate_checkpoint(path)
    source = load_model_source(path, manifest)
    strategy = manifest["strategy"]["name"]
    peft = manifest.get("peft")
    if not merge and not peft:
        raise ConfigError(
            f"merge=false: checkpoint {path} is a full fine-tuning run (no LoRA), "
            f"it has no adapter to export alone; use merge=true"
        )
    where = f"checkpoint {path}"
    name = source.model_class.__name__
    log.info(
        "export: %s (%s strategy, %s, %s) -> %s",
        path,
        strategy,
        "LoRA" if peft else "full fine-tuning",
        name,
        output_dir,
    )
    weights = iter_checkpoint_weights(path, manifest)
    if peft:
        settings = SimpleNamespace(**peft)
        adapter = split_lora(weights, where)
        if not merge:
            from persimmon_train.adapters import lora_config

            config = lora_config(settings, manifest["task"])
            config.base_model_name_or_path = manifest["model"]["base"].get("path")
            config.inference_mode = True
            files = write_adapter_folder(
                output_dir,
                {peft_saved_name(k): v for k, v in adapter.raw.items()},
                adapter_config=config,
                tokenizer=source.tokenizer,
                dtype=torch_dtype,
                overwrite=overwrite,
            )
            return ExportResult(os.path.abspath(output_dir), path, strategy, "adapter", name, dtype or "auto", files)
        tensors = iter_merged_lora(source.iter_base(), adapter, settings, set(source.expected_shapes()), where)
    else:
        tensors = iter_full(weights, where)
    shapes = source.expected_shapes()
    files = write_hf_folder(
        output_dir,
        tensors,
        architecture=name,
        config=source.config,
        tokenizer=source.tokenizer,
        expected_shapes=shapes,
        dtype=torch_dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress_total=len(shapes),
    )
    return ExportResult(
        os.path.abspath(output_dir), path, strategy, "merged" if peft else "full", name, dtype or "auto", files
    )


def export_run_outputs(result, cfg):
    """final/ (merged, cfg.export.dtype) and, for LoRA, adapter/ (PEFT, as trained); on rank 0 only."""
    if not (result.is_main and cfg.export.enabled and result.last_checkpoint):
        return result
    from persimmon_train.storage import validate_checkpoint
    from persimmon_train.storage.safetensors_io import release_free_memory

    gc.collect()  # the trainer's model and optimizer are gone: hand their memory back before streaming
    release_free_memory()
    manifest = validate_checkpoint(result.last_checkpoint)  # once, for both exports below
    final = os.path.join(result.output_dir, "final")
    export_checkpoint(result.last_checkpoint, final, dtype=cfg.export.dtype, overwrite=True, manifest=manifest)
    result.final_dir = final
    log.info("final model (%s%s): %s", cfg.export.dtype, ", LoRA merged" if cfg.peft.method == "lora" else "", final)
    if cfg.peft.method == "lora":
        adapter = os.path.join(result.output_dir, "adapter")
        export_checkpoint(result.last_checkpoint, adapter, dtype="auto", merge=False, overwrite=True, manifest=manifest)
        result.adapter_dir = adapter
        log.info("LoRA adapter (PEFT format, as trained): %s", adapter)
    return result
