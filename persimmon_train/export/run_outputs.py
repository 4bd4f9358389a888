"""The end of a training run: its last checkpoint exported as `final/` (and `adapter/` for LoRA).

"Save the last checkpoint, then export it" through the same streaming code as `persimmon-train
export`: rank 0 reads the checkpoint back from disk after the process group is gone, so the end
of a run at any world size needs no full gather onto one rank (for Persimmon-8B that gather was
~19-37 GB on one host and a long collective, the classic cause of NCCL time-outs at the end of
multi-day jobs), and host memory stays near one shard.
"""

from __future__ import annotations

import gc
import logging
import os

from persimmon_train.export.exporter import export_checkpoint

log = logging.getLogger("persimmon_train")


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


def train_and_export(cfg, job: str):
    """What finetune / classify / tag run: train, then export the last checkpoint (still holding
    output_dir's lock, so no other run writes there until final/ and adapter/ are complete)."""
    from persimmon_train.training.run import train

    result = train(cfg, job, keep_lock=True)
    try:
        return export_run_outputs(result, cfg)
    finally:
        result.release_lock()
