"""ZeRO-3 from model.path without a full copy of the model per rank.

The model arrives built on the meta device (with LoRA and activation checkpointing applied), like
FSDP's. Module by module, in model order, each rank allocates that module's parameters, rank 0
fills them from the safetensors files (or the seeded fresh init for LoRA adapters / new heads, as
parallel/sharded_load.py does for FSDP), and DeepSpeed's `zero.Init` broadcasts rank 0's values
and keeps this rank's partition. So a rank holds its partitions plus ONE module in full at a time,
never the whole model (`from_pretrained` on every rank held all of it: 35 GB per rank for 8B).

deepspeed.initialize then finds parameters that are already ZeRO-3 partitioned (as if the model
had been built inside `deepspeed.zero.Init`) and does not partition them again.
"""

from __future__ import annotations

import torch
from torch import nn

from persimmon_train.parallel.sharded_load import LoadPlan


def materialize_zero3(
    model: nn.Module, folder: str, ds_config: dict, *, seed: int, is_main: bool, device: torch.device
) -> dict:
    """Fill and partition every parameter of the meta-built `model` from `folder`. Returns {"loaded", "fresh"}."""
    import deepspeed

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    plan = LoadPlan(model, folder, fresh_prefixes=type(base).head_prefixes, ignore=type(base).foreign_head_keys)
    generator = torch.Generator().manual_seed(seed)
    init_std = base.config.initializer_range
    dtype = torch.bfloat16 if (ds_config.get("bf16") or {}).get("enabled") is True else torch.float32
    for prefix, module in model.named_modules():
        if not any(p.is_meta for p in module.parameters(recurse=False)):
            continue  # no parameters of its own, or a tied one materialised already
        module.to_empty(device=device, recurse=False)
        own = {f"{prefix}.{name}" if prefix else name: param for name, param in module.named_parameters(recurse=False)}
        for param in own.values():  # the dtype a model built inside zero.Init has (bf16 runs: bf16)
            param.data = param.data.to(dtype)
        if is_main:  # the others receive rank 0's values in zero.Init's broadcast
            plan.fill(own, generator, init_std)
        # zero.Init(module=...) converts (broadcast from rank 0, then partition) the parameters of the
        # module it is given, recursively; a holder with just these keeps the meta children out.
        holder = nn.Module()
        for i, param in enumerate(own.values()):
            holder.register_parameter(f"p{i}", param)
        deepspeed.zero.Init(module=holder, config_dict_or_path=ds_config)
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            raise RuntimeError(
                f"zero3_load: buffer {name} is on the meta device; the model has buffers this loader does not fill"
            )
    return {"loaded": len(plan.source), "fresh": plan.fresh}
