"""QLoRA's frozen base in NF4 (`peft.quantize_base=nf4`): 4-bit decoder matrices under the adapters.

Every frozen `nn.Linear` weight inside the decoder layers (LoRA's base layers and any other frozen
decoder Linear: query_key_value, dense, dense_h_to_4h, dense_4h_to_h) becomes a torchao
`NF4Tensor`: the 16 NormalFloat-4 code values of the QLoRA paper, one per value, times the absmax
of its block of 64 values; the block absmaxes themselves are double-quantized to int8 in blocks of
256 around their mean (torchtune's settings). Embedding, lm_head, norms and biases stay as
parallel/frozen_weights.py holds them (bf16 matrices, float32 vectors).

An `nn.Linear` over an NF4 weight calls `F.linear`, which torchao routes to `linear_nf4`: the
weight is dequantized to bf16 for each matmul (and again in backward, for the input's gradient),
never stored dequantized. peft's LoRA layer calls its base layer, so adapters see the same path.
NF4 dequantizes to bf16, so it needs a bf16 run (`check_nf4_precision`).

Loading (`quantize_on_meta` + `load_nf4`): with model.path the model is built on the meta device,
each target weight is replaced by an NF4 placeholder there (so `to_empty` allocates 4-bit storage,
never a bf16 model), then each tensor is read from the files in bf16, one at a time, quantized on
the training device and put in place. Under FSDP2 every rank quantizes the whole tensor and keeps
its rows: the double quantization's scaler mean is per tensor, and torchao's all-gather assumes all
shards share it. torchao implements FSDP2's all-gather hooks for NF4 (`fsdp_pre_all_gather`), so a
rank gathers the 4-bit data, not bf16.

Shapes: a tensor (and, under FSDP2, each rank's rows of it) must hold a multiple of 64 x 256 values
(torchao's double quantization); Persimmon-8B's matrices do (4096 x 4096 = 1024 x 16384).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from persimmon_train.errors import ConfigError, WeightsError

log = logging.getLogger("persimmon_train")

BLOCK_SIZE = 64  # values per absmax
SCALER_BLOCK_SIZE = 256  # absmaxes per int8 double-quantization block
QUANTUM = BLOCK_SIZE * SCALER_BLOCK_SIZE


def nf4_api():
    """(NF4Tensor, to_nf4) from torchao (imported with its import-time warnings silenced)."""
    from persimmon_train.adapters.lora import torchao_quiet

    try:
        with torchao_quiet():
            try:
                from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, to_nf4
            except ImportError:  # torchao releases before 0.15
                from torchao.dtypes import NF4Tensor, to_nf4
    except ImportError:
        raise ConfigError("peft.quantize_base=nf4 needs torchao (pip install torchao)") from None
    return NF4Tensor, to_nf4


def is_nf4(tensor) -> bool:
    """True for an NF4 tensor or a DTensor whose local shard is one (without importing torchao)."""
    local = getattr(tensor, "_local_tensor", tensor)
    return type(local).__name__ == "NF4Tensor"


def check_nf4_precision(quantize_base: str, precision: str) -> None:
    """NF4 dequantizes to bf16 for every matmul: refuse a float32 run (precision already resolved)."""
    if quantize_base == "nf4" and precision != "bf16":
        raise ConfigError(
            f"peft.quantize_base: nf4 needs bf16 compute but trainer.precision resolved to {precision} "
            f"on this device; set trainer.precision=bf16"
        )


def frozen_decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear inside the decoder layers whose weight does not train."""
    from persimmon_train.parallel.activation_checkpointing import decoder_layers

    inside = {id(m) for m in decoder_layers(model).modules()}
    return [
        (name, m)
        for name, m in model.named_modules()
        if id(m) in inside and isinstance(m, nn.Linear) and not m.weight.requires_grad
    ]


def check_quantizable(name: str, shape, shards: int) -> None:
    rows, cols = shape
    if rows % shards or (rows // shards) * cols % QUANTUM:
        where = f"each of {shards} shards" if shards > 1 else "the tensor"
        raise WeightsError(
            f"peft.quantize_base=nf4: {name}.weight has shape {list(shape)}; NF4 needs {where} to hold a "
            f"multiple of {QUANTUM} values (blocks of {BLOCK_SIZE}, scalers in blocks of {SCALER_BLOCK_SIZE})"
        )


def quantize_frozen_linears(model: nn.Module, shards: int = 1) -> int:
    """Replace each frozen decoder Linear weight by NF4; return how many.

    On the meta device this makes placeholders (shape and layout only) that `load_nf4` fills; a
    materialised weight (random init, no model.path) is quantized from its bf16 values here.
    `shards`: how many FSDP shards will split each tensor's rows (1: unsharded)."""
    _, to_nf4 = nf4_api()
    targets = frozen_decoder_linears(model)
    for name, module in targets:
        check_quantizable(name, module.weight.shape, shards)
    for _, module in targets:
        weight = module.weight.detach().to(torch.bfloat16)
        module.weight = nn.Parameter(to_nf4(weight, BLOCK_SIZE, SCALER_BLOCK_SIZE), requires_grad=False)
    log.info(
        "peft.quantize_base=nf4: %d frozen decoder matrices held in NF4 (blocks of %d, double-quantized scalers)",
        len(targets),
        BLOCK_SIZE,
    )
    return len(targets)


def load_nf4(model: nn.Module, name: str, full: torch.Tensor, rows: slice) -> None:
    """Quantize `full` (the whole tensor `name`, any float dtype) to NF4 on the parameter's device and
    put it in place of the placeholder: the whole tensor, or (a DTensor shard) rows [start, stop)."""
    _, to_nf4 = nf4_api()
    module_name, attr = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    old = module._parameters[attr]
    local_old = getattr(old, "_local_tensor", old)
    quantized = to_nf4(full.to(device=local_old.device, dtype=torch.bfloat16), BLOCK_SIZE, SCALER_BLOCK_SIZE)
    if not hasattr(old, "device_mesh"):
        module._parameters[attr] = nn.Parameter(quantized, requires_grad=False)
        return
    from torch.distributed.tensor import DTensor

    # This rank's rows, with their own storage (torchtune's way: new_zeros + copy_ keeps the
    # tensor-wide scaler mean, which every shard must share for torchao's all-gather).
    count = rows.stop - rows.start
    chunk = quantized.split(count, dim=0)[rows.start // count]
    local = chunk.new_zeros(chunk.size())
    local.copy_(chunk)
    sharded = DTensor.from_local(
        local, old.device_mesh, old.placements, run_check=False, shape=old.shape, stride=old.stride()
    )
    # FSDP2 picks the new parameter up at its lazy init (FSDPParam.reset_sharded_param).
    module._parameters[attr] = nn.Parameter(sharded, requires_grad=False)
