"""Fill a sharded (DTensor) model that was built on the meta device, each rank reading only its part.

After `fully_shard` on meta tensors and `to_empty`, every parameter is a DTensor whose local shard
is uninitialised memory. For each parameter we compute which slice of the global tensor this rank
holds (from the DTensor's mesh and placements) and read exactly that slice from the HF
safetensors file with `safe_open(...).get_slice(name)[...]` -- so no rank ever materialises a
whole tensor it does not own, let alone the whole model.

Parameters the file cannot have (LoRA adapters, a classification head on a causal-LM checkpoint)
are initialised from a generator seeded identically on every rank: each rank builds the (small)
full tensor and keeps its slice, so the shards agree.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from persimmon_train.adapters.lora import ADAPTER_NAME as ADAPTER
from persimmon_train.adapters.lora import strip_peft_prefix
from persimmon_train.errors import WeightsError
from persimmon_train.storage.safetensors_io import has_nonfinite


def file_name(param_name: str) -> str:
    """The HF checkpoint name a (possibly peft-wrapped) model parameter is loaded from."""
    name = strip_peft_prefix(param_name)
    for wrapper in (".base_layer.", ".original_module.", f".modules_to_save.{ADAPTER}."):
        name = name.replace(wrapper, ".")
    return name


def local_slices(param: torch.Tensor) -> tuple[slice, ...]:
    """The global index ranges this rank's shard of `param` covers (whole tensor if not a DTensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return tuple(slice(0, n) for n in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if hasattr(param, "to_local") else param


def _fresh_full(name: str, shape, generator: torch.Generator, std: float) -> torch.Tensor:
    """peft's default LoRA init (A: kaiming-uniform a=sqrt(5), B: zeros); heads: normal(std), biases 0."""
    full = torch.empty(shape, dtype=torch.float32)
    if f".lora_A.{ADAPTER}." in name:
        nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
    elif f".lora_B.{ADAPTER}." in name or name.endswith("bias") or len(shape) < 2:
        nn.init.zeros_(full)
    else:
        nn.init.normal_(full, std=std, generator=generator)
    return full


def load_into_meta_model(model: nn.Module, folder: str, *, device, seed: int) -> dict:
    """Allocate a meta-built model (plain or peft-wrapped, sharded or not) on `device` and fill it from
    `folder`; new heads and LoRA adapters get the seeded fresh init. Each tensor is read in the dtype
    its parameter has (frozen matrices of a bf16 run: bf16)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model.to_empty(device=device)
    return load_sharded_safetensors(
        model,
        folder,
        fresh_prefixes=type(base).head_prefixes,
        ignore=type(base).foreign_head_keys,
        seed=seed,
        init_std=base.config.initializer_range,
    )


def load_sharded_safetensors(
    model: nn.Module,
    folder: str,
    *,
    fresh_prefixes: tuple[str, ...],
    ignore: tuple[str, ...],
    seed: int,
    init_std: float,
) -> dict:
    """Fill every parameter's local shard from `folder` (HF safetensors) or a seeded fresh init.

    `fresh_prefixes`: HF names that may be missing from the file (new heads); LoRA adapter weights
    are always fresh. `ignore`: file names not to load (another head's weights).
    Returns {"loaded": n, "fresh": [names]}.
    """
    plan = LoadPlan(model, folder, fresh_prefixes=fresh_prefixes, ignore=ignore)
    plan.fill(dict(model.named_parameters()), torch.Generator().manual_seed(seed), init_std, model=model)
    return {"loaded": len(plan.source), "fresh": plan.fresh}


class LoadPlan:
    """Where each parameter of `model` comes from: a tensor of `folder`'s safetensors, or a fresh init.

    Built once, checked against the whole model (missing / unexpected names fail before anything
    is read); `fill` may then be called on any subset of the parameters, e.g. one module at a time
    (ZeRO-3 materialises and partitions module by module), as long as the calls follow module order
    and share one generator: the fresh values are then the same as in one call over the model.
    """

    def __init__(self, model: nn.Module, folder: str, *, fresh_prefixes: tuple[str, ...], ignore: tuple[str, ...]):
        from persimmon_train.storage import read_header, read_weight_map

        weight_map = read_weight_map(folder)  # validates the folder and headers first
        self.source: dict[str, tuple[str, object]] = {}  # param name -> (file, header entry)
        self.fresh: list[str] = []
        missing, headers = [], {}
        for name, param in model.named_parameters():
            source = file_name(name)
            if ".lora_A." in name or ".lora_B." in name:
                self.fresh.append(name)
            elif source in weight_map:
                path = weight_map[source]
                if path not in headers:
                    headers[path] = read_header(path)
                entry = headers[path][source]
                if tuple(entry.shape) != tuple(param.shape):
                    raise WeightsError(
                        f"tensor {source} in {path} has shape {list(entry.shape)} but "
                        f"the model expects {list(param.shape)}"
                    )
                self.source[name] = (path, entry)
            elif source.startswith(fresh_prefixes):
                self.fresh.append(name)
            else:
                missing.append(source)
        used = {file_name(n) for n in self.source}
        unexpected = sorted(set(weight_map) - used - set(ignore))
        if missing or unexpected:
            raise WeightsError(
                f"{folder}: weights do not match the model: missing {sorted(missing)[:5]} unexpected {unexpected[:5]}"
            )

    def fill(
        self,
        params: dict[str, torch.Tensor],
        generator: torch.Generator,
        init_std: float,
        model: nn.Module | None = None,
    ) -> None:
        """Fill the local shard of each of `params` (name -> parameter): file tensors, then fresh ones.

        NF4 placeholders (peft.quantize_base=nf4, parallel/nf4.py) are replaced in `model` instead:
        the whole tensor is read in bf16, quantized, and this rank's rows kept."""
        from safetensors import safe_open

        from persimmon_train.parallel.nf4 import is_nf4, load_nf4

        by_file: dict[str, list[str]] = defaultdict(list)
        for name in params:
            if name in self.source:
                by_file[self.source[name][0]].append(name)
        with torch.no_grad():
            for path, names in by_file.items():
                with open(path, "rb") as raw, safe_open(path, framework="pt", device="cpu") as handle:
                    for name in names:
                        param, entry = params[name], self.source[name][1]
                        source, dtype, shape = file_name(name), entry.torch_dtype, entry.shape
                        index = local_slices(param)
                        local = _local(param)
                        if is_nf4(param):  # one whole bf16 tensor at a time, then 4 bits
                            full = torch.empty(tuple(shape), dtype=torch.bfloat16)
                            _read_rows(raw, entry.begin, dtype, shape, slice(0, shape[0]), full)
                            if has_nonfinite(full):
                                raise WeightsError(
                                    f"tensor {source} in {path} holds NaN/Inf values; refusing to load it"
                                )
                            load_nf4(model, name, full, index[0])
                            continue
                        if _rows_only(index, shape) and local.is_contiguous() and local.device.type == "cpu":
                            _read_rows(raw, entry.begin, dtype, shape, index[0] if index else slice(0, 1), local)
                        else:  # column shards etc.: safetensors' (memory-mapped) slicing
                            local.copy_(handle.get_slice(source)[index] if param.ndim else handle.get_tensor(source))
                        if has_nonfinite(local):  # a damaged download, named before training starts
                            raise WeightsError(f"tensor {source} in {path} holds NaN/Inf values; refusing to load it")
            for name in self.fresh:  # module order: identical on every rank
                if name in params:
                    param = params[name]
                    _local(param).copy_(_fresh_full(name, tuple(param.shape), generator, init_std)[local_slices(param)])


def _rows_only(index: tuple[slice, ...], shape) -> bool:
    """True when the shard is a block of whole rows (FSDP's Shard(0)): contiguous bytes in the file."""
    return all(s.start == 0 and s.stop == n for s, n in zip(index[1:], shape[1:]))


def _read_rows(raw, offset: int, dtype: torch.dtype, shape, rows: slice, out: torch.Tensor) -> None:
    """Read rows [start, stop) straight from the file into `out` (a plain read, not a memory map, so
    the file's pages do not count against this rank's memory); one shard-sized buffer if the dtype differs."""
    row_elems = 1
    for n in shape[1:]:
        row_elems *= n
    count = (rows.stop - rows.start) * row_elems
    if count == 0:
        return
    itemsize = torch.empty((), dtype=dtype).element_size()
    buffer = out if out.dtype == dtype else torch.empty(out.shape, dtype=dtype)
    raw.seek(offset + rows.start * row_elems * itemsize)
    view = memoryview(buffer.view(torch.uint8).numpy() if dtype != torch.bool else buffer.numpy()).cast("B")
    if raw.readinto(view) != count * itemsize:
        raise WeightsError(f"{raw.name}: truncated tensor data")
    if buffer is not out:
        out.copy_(buffer)
