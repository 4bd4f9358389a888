"""Hugging Face safetensors weights in and out: one file or shards plus an index, like transformers.

A model folder holds either ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards
with ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map":
{tensor: file}}``). Saving writes exactly that layout; loading accepts it from us, transformers or
peft's merged exports.

Loading is built for an 8B model on a machine that cannot hold two copies of it:

1. Everything that can be wrong is checked first, from the files' headers only (a few KB each):
   folder, index, shard files, header sanity and truncation, missing / unexpected keys, shapes.
   A bad folder fails with one ``WeightsError`` line before a single tensor is read.
2. Tensors are then read one at a time with ``safetensors.safe_open`` and put straight into the
   module. On CPU safetensors hands back tensors that are views of a private (copy-on-write)
   memory map of the file, so a model built on the meta device ends up holding the only copy of
   the weights (like ``torch.load(mmap=True)`` + ``load_state_dict(assign=True)``); a dtype cast
   costs one tensor at a time.

Nothing here unpickles anything: ``pytorch_model.bin`` folders are refused with a hint.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from persimmon_train.errors import ConfigError, WeightsError

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_TMP_SUFFIX = ".tmp"
# Files we refuse to read (pickles can run code) but recognise, to tell the user what to do.
_PICKLE_WEIGHT_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
# safetensors itself refuses headers over 100 MB; a bigger length field means a corrupt file.
_MAX_HEADER_BYTES = 100_000_000
_LIST_LIMIT = 10

_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,  # decimal, as transformers / huggingface_hub
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)

# safetensors dtype tags -> torch dtypes (getattr: some only exist in newer torch builds).
_FILE_DTYPES = {
    tag: getattr(torch, name)
    for tag, name in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, name)
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"10KB"``, ``"2GiB"``, ``"1234"``.

    KB/MB/GB/TB are decimal (as in transformers' ``max_shard_size``), KiB/MiB/GiB/TiB binary.
    """
    if isinstance(size, bool):
        raise ConfigError(f"max_shard_size {size!r} is not a size")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        match = _SIZE_RE.match(size)
        unit = match.group(2).upper() if match else None
        if unit not in _SIZE_UNITS:
            raise ConfigError(
                f"max_shard_size {size!r} is not a size: use bytes or a number with "
                "KB/MB/GB/TB (or KiB/MiB/GiB/TiB), e.g. '5GB'"
            )
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ConfigError(f"max_shard_size {size!r} is not a size: give an int or a string like '5GB'")
    if value <= 0:
        raise ConfigError(f"max_shard_size {size!r} must be positive")
    return value


# --------------------------------------------------------------------------------------- saving


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``state_dict`` as HF safetensors into ``folder``; returns the weight file names written.

    One ``model.safetensors`` if the tensors fit in ``max_shard_size``, else shards named and
    indexed exactly as transformers does (greedy split in key order; a tensor bigger than the
    limit gets a shard of its own). Tensors are written detached, contiguous and on CPU, one
    shard at a time, so host memory holds at most one shard beyond the caller's tensors.
    Tensors sharing storage with one already in the shard are cloned (safetensors refuses
    aliases). Every file is written under ``<name>.tmp`` and renamed, so an interrupted save never
    leaves a half file under a final name; weight files of an earlier save that the new one does
    not reference are removed. Call it from one process only (rank 0); tensors must be full
    (gather FSDP/ZeRO shards first).
    """
    metadata = {"format": "pt"} if metadata is None else dict(metadata)
    limit = parse_size(max_shard_size)
    folder = os.fspath(folder)
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise WeightsError(f"cannot save {name}: it is a {type(tensor).__name__}, not a tensor")
        if tensor.is_meta:
            raise WeightsError(f"cannot save {name}: it is on the meta device (no data)")

    shards = _plan_shards({name: _nbytes(t) for name, t in state_dict.items()}, limit)
    if len(shards) == 1:
        file_names = [SAFE_WEIGHTS_NAME]
    else:
        file_names = [_SHARD_NAME.format(index=i + 1, count=len(shards)) for i in range(len(shards))]
    os.makedirs(folder, exist_ok=True)

    if len(shards) > 1:
        # A stale single file would win over the new index at load time (transformers looks for
        # model.safetensors first), so it goes before anything new is written.
        _remove_if_present(os.path.join(folder, SAFE_WEIGHTS_NAME))

    for file_name, names in zip(file_names, shards):
        shard = _cpu_shard(state_dict, names)
        _atomic_write(os.path.join(folder, file_name), lambda tmp, shard=shard: save_file(shard, tmp, metadata=metadata))
        del shard

    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(t) for t in state_dict.values())},
            "weight_map": {name: file_name for file_name, names in zip(file_names, shards) for name in names},
        }
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        _atomic_write(os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME), lambda tmp: _write_text(tmp, text))
    else:
        _remove_if_present(os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME))
    _remove_stale_weight_files(folder, keep=set(file_names))
    return file_names


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _plan_shards(sizes: Mapping[str, int], limit: int) -> list[list[str]]:
    """Greedy split in key order, the same rule as huggingface_hub's split_torch_state_dict_into_shards."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes.items():
        if size > limit:
            shards.append([name])
            continue
        if current and current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current or not shards:
        shards.append(current)
    return shards


def _cpu_shard(state_dict: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    shard: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name in names:
        tensor = state_dict[name].detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in storages:
            tensor = tensor.clone()  # tied / aliased weights: safetensors refuses shared storage
        storages.add(tensor.untyped_storage().data_ptr())
        shard[name] = tensor
    return shard


def _atomic_write(path: str, write) -> None:
    tmp = path + _TMP_SUFFIX
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_if_present(tmp)
        raise


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _remove_stale_weight_files(folder: str, keep: set[str]) -> None:
    """Drop shards of an earlier save (and temp files of an interrupted one) that nothing references."""
    for entry in os.listdir(folder):
        stale_shard = _SHARD_RE.fullmatch(entry) and entry not in keep
        stale_tmp = entry.endswith(_TMP_SUFFIX) and (
            _SHARD_RE.fullmatch(entry[: -len(_TMP_SUFFIX)])
            or entry[: -len(_TMP_SUFFIX)] in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
        )
        if (stale_shard or stale_tmp) and os.path.isfile(os.path.join(folder, entry)):
            os.remove(os.path.join(folder, entry))


# ------------------------------------------------------------------------------ folder inspection


@dataclass(frozen=True)
class _FileTensor:
    """Where one tensor lives, from the file header (no data read)."""

    path: str
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]


def read_weight_map(folder: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> path of the safetensors file holding it (folder, index and headers validated)."""
    return {name: info.path for name, info in _inspect_folder(os.fspath(folder)).items()}


def iter_safetensors(
    folder: str | os.PathLike, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time, file by file, after validating the whole folder.

    CPU tensors are copy-on-write views of the file's memory map: cheap to stream, safe to modify.
    """
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, info in _inspect_folder(os.fspath(folder)).items():
        by_file[info.path].append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device=str(device)) as handle:
            for name in names:
                yield name, handle.get_tensor(name)


def _inspect_folder(folder: str) -> dict[str, _FileTensor]:
    """Validate a weights folder from its index and headers; tensor name -> _FileTensor."""
    if not os.path.exists(folder):
        raise WeightsError(f"weights folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise WeightsError(f"weights path {folder} is not a folder")

    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    index_path = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    # Same precedence as transformers: the single file first, then the index.
    if os.path.isfile(single):
        return {
            name: _FileTensor(single, dtype, shape)
            for name, (dtype, shape) in _read_header(single).items()
        }
    if os.path.isfile(index_path):
        return _inspect_index(folder, index_path)

    pickles = [name for name in _PICKLE_WEIGHT_NAMES if os.path.exists(os.path.join(folder, name))]
    pickles += sorted(
        entry for entry in os.listdir(folder)
        if re.fullmatch(r"pytorch_model-\d{5}-of-\d{5}\.bin", entry)
    )[:1]
    hint = (
        f"; found {', '.join(pickles)}: pickle weights are not loaded, convert to safetensors"
        if pickles else ""
    )
    raise WeightsError(
        f"no weights in {folder}: expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}{hint}"
    )


def _inspect_index(folder: str, index_path: str) -> dict[str, _FileTensor]:
    try:
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"weights index {index_path} is unreadable: {error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(file, str) for name, file in weight_map.items()
    ):
        raise WeightsError(
            f"weights index {index_path} is malformed: expected "
            '{"weight_map": {"tensor name": "file name", ...}}'
        )

    names_by_file: dict[str, list[str]] = defaultdict(list)
    for name, file_name in weight_map.items():
        names_by_file[file_name].append(name)
    entries: dict[str, _FileTensor] = {}
    for file_name, names in names_by_file.items():
        path = os.path.join(folder, file_name)
        if os.path.basename(file_name) != file_name or not os.path.isfile(path):
            raise WeightsError(
                f"weights index {index_path} maps {len(names)} tensors (e.g. {names[0]}) to "
                f"{file_name}, which is missing from {folder}"
            )
        header = _read_header(path)
        for name in names:
            if name not in header:
                raise WeightsError(
                    f"weights index {index_path} maps tensor {name} to {path}, which has no such tensor"
                )
            dtype, shape = header[name]
            entries[name] = _FileTensor(path, dtype, shape)
    return entries


def _read_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Parse and sanity-check a safetensors header: name -> (dtype tag, shape). Reads no tensor data.

    Catches garbage files and truncated downloads: the byte size must cover every tensor's
    ``data_offsets``, which safetensors itself only discovers when that tensor is read.
    """
    file_size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _Corrupt(f"only {file_size} bytes, shorter than the 8-byte header length")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > min(file_size - 8, _MAX_HEADER_BYTES):
                raise _Corrupt(f"header length field says {header_size} bytes but the file has {file_size}")
            header = json.loads(handle.read(header_size).decode("utf-8"))
        if not isinstance(header, dict):
            raise _Corrupt("header is not a JSON object")
        data_size = file_size - 8 - header_size
        tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
        largest_end, largest_name = 0, None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, start, end = _parse_entry(name, entry)
            if end > largest_end:
                largest_end, largest_name = end, name
            tensors[name] = (dtype, shape)
    except _Corrupt as error:
        raise WeightsError(f"weights file {path} is corrupt: {error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"weights file {path} is corrupt: header is not valid JSON ({error})") from None
    if largest_end > data_size:
        raise WeightsError(
            f"weights file {path} is truncated: tensor {largest_name} ends at data byte {largest_end} "
            f"but the file holds only {data_size} data bytes ({file_size} bytes in all)"
        )
    return tensors


class _Corrupt(Exception):
    pass


def _parse_entry(name: str, entry) -> tuple[str, tuple[int, ...], int, int]:
    try:
        dtype = entry["dtype"]
        shape = tuple(entry["shape"])
        start, end = entry["data_offsets"]
        valid = (
            isinstance(dtype, str)
            and all(isinstance(dim, int) and dim >= 0 for dim in shape)
            and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end
        )
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise _Corrupt(f"tensor {name} has a bad header entry {entry!r}")
    if dtype not in _FILE_DTYPES:
        raise _Corrupt(f"tensor {name} has dtype {dtype}, which this torch cannot load")
    expected = math.prod(shape) * torch.empty((), dtype=_FILE_DTYPES[dtype]).element_size()
    if end - start != expected:
        raise _Corrupt(
            f"tensor {name} spans {end - start} bytes but shape {list(shape)} {dtype} needs {expected}"
        )
    return dtype, shape, start, end


# --------------------------------------------------------------------------------------- loading


def load_safetensors_into(
    module: torch.nn.Module,
    folder: str | os.PathLike,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    ignore_keys: Iterable[str] = (),
    device: str | torch.device = "cpu",
) -> None:
    """Load HF safetensors weights from ``folder`` into ``module`` (possibly built on the meta device).

    - Validates everything (folder, index, headers, keys, shapes) before reading any tensor.
    - ``strict``: the files must hold exactly the module's state-dict keys (tied weights need one
      of their names). Shape mismatches are errors either way.
    - ``ignore_keys``: names or fnmatch patterns (``"score.*"``) left out of loading and of the
      missing / unexpected checks.
    - dtype: floating tensors become ``dtype`` when given; otherwise a tensor keeps the dtype of
      the module's tensor, or the file's when the module's is on meta.
    - Meta tensors are replaced (Parameter type and ``requires_grad`` kept) by tensors on
      ``device``; real tensors are updated in place (or replaced on their own device when the
      dtype changes). Non-persistent buffers (rope ``inv_freq``) are not touched.
    - Afterwards no state-dict tensor may still be on meta (raises ``WeightsError`` naming them).
    """
    folder = os.fspath(folder)
    files = _inspect_folder(folder)
    ignore = tuple(ignore_keys)

    def ignored(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore)

    targets = module.state_dict(keep_vars=True)  # persistent tensors only, tied ones under each name
    groups: dict[int, list[str]] = defaultdict(list)  # names sharing one tensor object (tied weights)
    for name, tensor in targets.items():
        groups[id(tensor)].append(name)

    missing, plan = [], []  # plan: (file name to read, all module names it fills)
    for names in groups.values():
        wanted = [name for name in names if not ignored(name)]
        present = [name for name in wanted if name in files]
        if present:
            plan.append((present[0], names))  # tied names stay one tensor, even an ignored alias
        elif wanted:
            missing.append(wanted[0])
    unexpected = [name for name in files if name not in targets and not ignored(name)]
    if strict and (missing or unexpected):
        raise WeightsError(_key_mismatch_message(folder, missing, unexpected, files))

    mismatched = [
        name for name, tensor in targets.items()
        if name in files and not ignored(name) and files[name].shape != tuple(tensor.shape)
    ]
    if mismatched:
        name = mismatched[0]
        more = f" (and {len(mismatched) - 1} more shape mismatches)" if len(mismatched) > 1 else ""
        raise WeightsError(
            f"tensor {name} in {files[name].path} has shape {list(files[name].shape)} "
            f"but the model expects {list(targets[name].shape)}{more}"
        )
    owners = {name: _owner(module, name) for _, names in plan for name in names}

    by_file: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)
    for source, names in plan:
        by_file[files[source].path].append((source, names))
    for path, items in by_file.items():
        with safe_open(path, framework="pt", device=str(device)) as handle:
            for source, names in items:
                current = targets[names[0]]
                value = handle.get_tensor(source)
                value = value.to(_target_dtype(value.dtype, current, dtype))
                _put(value, current, [owners[name] for name in names])
                del value

    still_meta = [name for name, tensor in module.state_dict(keep_vars=True).items() if tensor.is_meta]
    if still_meta:
        raise WeightsError(
            f"after loading {folder}, {len(still_meta)} tensors are still on the meta device "
            f"(not in the weights files): {_preview(still_meta)}"
        )


def _target_dtype(file_dtype: torch.dtype, current: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None and file_dtype.is_floating_point:
        return dtype
    return file_dtype if current.is_meta else current.dtype


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    if leaf not in owner._parameters and leaf not in owner._buffers:
        raise WeightsError(f"state-dict key {name} is neither a parameter nor a buffer of the module")
    return owner, leaf


def _put(value: torch.Tensor, current: torch.Tensor, owners: list[tuple[torch.nn.Module, str]]) -> None:
    """Give every (tied) name the loaded value: in place when possible, else by replacement."""
    if not current.is_meta and value.dtype == current.dtype:
        with torch.no_grad():
            current.copy_(value)
        return
    if not current.is_meta:
        value = value.to(current.device)
    if isinstance(current, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=current.requires_grad)
    for owner, leaf in owners:
        if leaf in owner._parameters:
            owner._parameters[leaf] = value
        else:
            owner._buffers[leaf] = value


def _key_mismatch_message(folder: str, missing: list[str], unexpected: list[str], files) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors the model needs are missing: {_preview(missing)}")
    if unexpected:
        described = [f"{name} ({os.path.basename(files[name].path)})" for name in unexpected]
        parts.append(f"{len(unexpected)} tensors the model does not have: {_preview(described)}")
    return f"weights in {folder} do not match the model: " + "; ".join(parts)


def _preview(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    return shown + (f" ... (+{len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else "")
