"""Resume a DeepSpeed checkpoint at another world size or ZeRO stage.

DeepSpeed's engine.load_checkpoint reads a ZeRO checkpoint only into the same number of ranks
("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not
currently supported"); its universal-checkpoint route needs an offline conversion that writes a
second copy of the state (12 bytes a parameter: ~113 GB for 8B) before the job may start. Instead,
every rank of the new engine reads the old partitions itself (storage.ZeroCheckpoint, memory-mapped,
one parameter at a time) and keeps what its new partition needs:

- the fp32 master weight and the AdamW moments through DeepSpeed's public setters
  (`safe_set_full_fp32_param`, `safe_set_full_optimizer_state`), which cut this rank's fragment;
- the low-precision copy the forward pass uses: ZeRO-1/2 hold it in full on every rank (copied in
  place, it stays a view of DeepSpeed's flat buffer); ZeRO-3 through `GatheredParameters`
  (collective: every rank walks the parameters in the same order), which re-partitions it;
- the optimizer's step count into every state of the base optimizer, its parameter groups'
  hyperparameters (lr included) and the engine's counters.

Nothing is written to disk.
"""

from __future__ import annotations

import logging

import torch

from persimmon_train.errors import CheckpointError
from persimmon_train.storage.safetensors_io import release_free_memory
from persimmon_train.storage.zero_checkpoint import STATE_KEYS, ZeroCheckpoint

log = logging.getLogger("persimmon_train")


def load_resharded(engine, folder: str) -> dict:
    """Fill `engine` (any ZeRO stage, any world size) from the checkpoint partitions in `folder`."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    checkpoint = ZeroCheckpoint(folder)
    stage = engine.zero_optimization_stage()
    trainable = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}
    _check_matches(checkpoint, trainable, engine.optimizer.optimizer.param_groups, stage, folder)
    step, written = checkpoint.step(), {"stage": checkpoint.stage, "world_size": checkpoint.world_size}
    _create_optimizer_state(engine.optimizer, stage)
    master = None
    for name, param in trainable.items():
        master = checkpoint.full(name, "fp32")
        safe_set_full_fp32_param(param, master)
        for key in STATE_KEYS[1:]:
            safe_set_full_optimizer_state(param, checkpoint.full(name, key), key)
        if stage == 3:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if engine.global_rank == 0:
                    param.data.copy_(master.to(param.dtype))
        else:
            with torch.no_grad():
                param.data.copy_(master.to(param.dtype))
    # The hyperparameters as they were at the save: the LR scheduler's restored state sets the
    # groups' lr only at its next step, so without this the first step would run at the initial lr.
    for group, hyper in zip(engine.optimizer.optimizer.param_groups, checkpoint.param_groups()):
        group.update(hyper)
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            state["step"] = step.clone().to(state["step"].device) if torch.is_tensor(state["step"]) else int(step)
    for key, value in checkpoint.counters.items():
        if value is not None:
            setattr(engine, key, value)
    del checkpoint, master
    # The per-parameter temporaries left free heap behind that glibc would keep for the whole run
    # (bench/zero_reshard_load.py: ZeRO-3, 193 MB model, 2 ranks: 272 -> 73-96 MB held after the load).
    release_free_memory()
    log.info(
        "deepspeed: resharded %s (ZeRO-%d, %d ranks) into ZeRO-%d on %d ranks: %d parameters, optimizer step %d",
        folder,
        written["stage"],
        written["world_size"],
        stage,
        engine.world_size,
        len(trainable),
        int(step),
    )
    return written


def _check_matches(checkpoint: ZeroCheckpoint, trainable: dict, groups: list, stage: int, folder: str) -> None:
    """Names, shapes and parameter groups agree, before anything is written into the engine."""
    missing = [name for name in trainable if name not in checkpoint.names]
    unknown = [name for name in checkpoint.names if name not in trainable]
    if missing or unknown:
        what = f"has no {missing[0]}" if missing else f"has {unknown[0]}, which this run does not train"
        raise CheckpointError(f"{folder}: the checkpoint {what} ({len(missing)} missing, {len(unknown)} unknown)")
    for name, param in trainable.items():
        saved = checkpoint.shapes[checkpoint.aliases.get(name, name)]
        shape = param.ds_shape if stage == 3 else param.shape
        if saved != shape:
            raise CheckpointError(f"{folder}: {name} is {tuple(saved)} in the checkpoint, {tuple(shape)} in this run")
    saved_groups = checkpoint.param_groups()
    if len(groups) != len(saved_groups):
        raise CheckpointError(f"{folder}: {len(saved_groups)} optimizer parameter groups, this run has {len(groups)}")


def _create_optimizer_state(zero, stage: int) -> None:
    """ZeRO creates AdamW's state at the first step (ZeRO-1/2 only then link each parameter's
    fragment of it, which safe_set_full_optimizer_state writes through). Before any step, create it
    as torch's AdamW would (zeros, step 0: every value is overwritten next)."""
    flats = getattr(zero, "fp32_partitioned_groups_flat" if stage == 3 else "single_partition_of_fp32_groups", None)
    link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None) if stage < 3 else (lambda: None)
    if flats is None or link is None or getattr(zero, "swap_optimizer", False):
        raise CheckpointError(
            f"deepspeed: cannot place optimizer state into {type(zero).__name__} (NVMe optimizer offload, "
            "or a DeepSpeed version this code does not know); resume at the world size and ZeRO stage "
            "that wrote the checkpoint"
        )
    for flat in flats:
        state = zero.optimizer.state[flat]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    link()
