"""Checkpoint -> HF folder (merged) or PEFT adapter folder: what `recipes/export.py` runs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from persimmon_train.errors import ConfigError
from persimmon_train.export.adapter import write_adapter_folder
from persimmon_train.export.checkpoint_source import (
    iter_checkpoint_weights,
    load_run_config,
    locate_checkpoint,
    run_config_path,
)
from persimmon_train.export.hf_folder import export_dtype, write_hf_folder
from persimmon_train.export.merge import iter_full, iter_merged_lora, split_lora
from persimmon_train.export.run_model import rebuild_run_model

log = logging.getLogger("persimmon_train")


@dataclass
class ExportResult:
    output_dir: str
    checkpoint: str
    strategy: str
    kind: str  # "merged" | "full" | "adapter"
    model_class: str
    files: list[str]


def _check_output_dir(out_dir: str, checkpoint: str) -> None:
    """Replacing a folder is fine for an earlier export, never for anything else."""
    out = os.path.abspath(out_dir)
    if out == checkpoint or checkpoint.startswith(out + os.sep):
        raise ConfigError(f"output_dir: {out} would replace the checkpoint it exports")
    if os.path.isdir(out) and os.listdir(out) and not any(
            os.path.isfile(os.path.join(out, name)) for name in ("config.json", "adapter_config.json")):
        raise ConfigError(f"output_dir: {out} exists and is not an earlier export (no config.json); "
                          f"choose a new or empty folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output_dir: {out} exists and is not a folder")


def export_checkpoint(checkpoint: str, output_dir: str, *, dtype: str = "bf16", merge: bool = True,
                      max_shard_size: int | str = "5GB", config: str | None = None) -> ExportResult:
    """Export a training checkpoint (any strategy; full or LoRA; any head).

    merge=True: a plain HF model folder (LoRA folded into the base) with config, generation config,
    sharded safetensors + index, and the tokenizer. merge=False: the LoRA adapter alone, PEFT format.
    """
    torch_dtype = export_dtype(dtype)
    from persimmon_train.checkpoint import parse_size

    parse_size(max_shard_size)  # a bad size fails before any work
    source = locate_checkpoint(checkpoint)
    _check_output_dir(output_dir, source.path)
    cfg = load_run_config(run_config_path(source, config))
    lora = cfg.peft.method == "lora"
    if not merge and not lora:
        raise ConfigError(f"merge=false: checkpoint {source.path} is a full fine-tuning run (peft.method=none), "
                          f"it has no adapter to export alone; use merge=true")
    run = rebuild_run_model(cfg)
    where = f"checkpoint {source.path}"
    log.info("export: %s (%s strategy, %s, %s) -> %s", source.path, source.strategy,
             "LoRA" if lora else "full fine-tuning", run.model_class.__name__, output_dir)

    if lora:
        adapter = split_lora(iter_checkpoint_weights(source), where)
        if not merge:
            files = write_adapter_folder(output_dir, adapter.raw, cfg, dtype=torch_dtype, tokenizer=run.tokenizer)
            return ExportResult(os.path.abspath(output_dir), source.path, source.strategy, "adapter",
                                run.model_class.__name__, files)
        tensors = iter_merged_lora(run.iter_base(), adapter, cfg.peft, set(run.expected_shapes()), where)
    else:
        tensors = iter_full(iter_checkpoint_weights(source), where)
    files = write_hf_folder(output_dir, tensors, model_class=run.model_class, config=run.config,
                            tokenizer=run.tokenizer, dtype=torch_dtype, max_shard_size=max_shard_size)
    return ExportResult(os.path.abspath(output_dir), source.path, source.strategy, "merged" if lora else "full",
                        run.model_class.__name__, files)
