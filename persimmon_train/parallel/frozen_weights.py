"""Frozen weights in the compute dtype: what a rank holds of the parameters that do not train.

Mixed precision needs float32 master weights only where an optimizer updates them. A LoRA run's
frozen base (or any frozen body) is read by bf16 matmuls and nothing else, so with
trainer.precision=bf16 its matrices are held in bf16: Persimmon-8B's frozen weights take 18.8 GB
instead of 37.6 GB. Trainable parameters (adapters, trained heads) keep float32 masters and
float32 optimizer state.

Nothing is lost against float32 storage of a bf16 (or float16) checkpoint: autocast, and FSDP2's
bf16 all-gather, round every matrix to bf16 before each matmul anyway, so the stored bf16 values
are exactly the ones a matmul saw. One-dimensional frozen parameters (LayerNorm weights, biases;
about 2M of the 8B's 9.4B) stay float32: LayerNorm runs in float32 on them, and they are too small
to matter. The embedding's rows are upcast as they are looked up (model/decoder.py), so the
residual stream stays float32 under autocast, as it is over a float32 embedding.

Called on the model as the strategy receives it, before anything is loaded: on the meta device
(a model.path run) the cast is free and each tensor is then read from the files in its final dtype,
so no float32 copy of a frozen matrix ever exists.
"""

from __future__ import annotations

import torch
from torch import nn


def hold_frozen_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen parameter of two or more dimensions to `dtype`; return how many were cast."""
    replaced: dict[int, nn.Parameter] = {}  # tied parameters stay one tensor
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.requires_grad or param.ndim < 2 or param.dtype == dtype:
                continue
            if id(param) not in replaced:
                replaced[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
            module._parameters[name] = replaced[id(param)]
    return len(replaced)


def hold_frozen_for(model: nn.Module, precision: str) -> int:
    """`hold_frozen_in` bf16 for a bf16 run (resolved trainer.precision); fp32 runs keep float32."""
    return hold_frozen_in(model, torch.bfloat16) if precision == "bf16" else 0
