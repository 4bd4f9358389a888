"""Safetensors on disk: the one header reader, dtype table, streaming reader and shard writer.

A weights folder holds ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards with
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {tensor:
file}}``) -- the layout transformers writes and reads.

Reading: everything that can be wrong is checked from the headers first (a few KB each): folder,
index, shard files, header sanity, truncation. A bad folder fails with one ``WeightsError`` line
before a tensor is read. Streaming reads (`iter_safetensors_file`) use a plain ``readinto`` per
tensor instead of a memory map: every page of a map stays resident until the file closes, so
streaming a 30 GB file through ``safe_open`` peaks near 30 GB.

Writing: `ShardWriter` writes each tensor's bytes into the open shard file as it arrives and
forgets the tensor; the shard's header goes into space reserved at the front of the file when the
shard is complete (safetensors allows a header padded with spaces). Shards are filled greedily in
arrival order like transformers (a tensor that would overflow the shard starts the next one; one
bigger than the limit gets its own). A `StoredTensor` (an unchanged tensor still in its source
file) is copied across in row blocks, cast on the way, so no whole copy of it is ever in memory.
Part files carry temporary names until `close()`, so an interrupted write never leaves a half file
under a final name.

Nothing here knows the model, and nothing unpickles: ``pytorch_model.bin`` folders are refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import re
import struct
import sys
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch

from persimmon_train.errors import ConfigError, WeightsError
from persimmon_train.storage.files import atomic_write_text, disk_errors, fsync_file

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_PART_NAME = "model-part-{index:05d}.safetensors.tmp"
# Temporary files of a write killed mid-way (ours, by name; older versions used the shard names + .tmp).
_STALE_TMP_RE = re.compile(r"model-(part-\d{5}|\d{5}-of-\d{5})\.safetensors\.tmp")
# Files we refuse to read (pickles can run code) but recognise, to tell the user what to do.
_PICKLE_WEIGHT_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
# safetensors itself refuses headers over 100 MB; a bigger length field means a corrupt file.
_MAX_HEADER_BYTES = 100_000_000
LIST_LIMIT = 10

# The dtype table: safetensors tags <-> torch dtypes (getattr: some only exist in newer torch builds).
DTYPES: dict[str, torch.dtype] = {
    tag: getattr(torch, name)
    for tag, name in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, name)
}
TAGS: dict[torch.dtype, str] = {dtype: tag for tag, dtype in DTYPES.items()}

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,  # decimal, as transformers / huggingface_hub
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(size: int | str, key: str = "max_shard_size") -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1234"``.

    KB/MB/GB/TB are decimal (as in transformers' ``max_shard_size``), KiB/MiB/GiB/TiB binary.
    """
    if isinstance(size, bool):
        raise ConfigError(f"{key}: {size!r} is not a size")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        match = _SIZE_RE.match(size)
        unit = match.group(2).upper() if match else None
        if unit not in _SIZE_UNITS:
            raise ConfigError(
                f"{key}: {size!r} is not a size: use bytes or a number with "
                "KB/MB/GB/TB (or KiB/MiB/GiB/TiB), e.g. '5GB'"
            )
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ConfigError(f"{key}: {size!r} is not a size: give an int or a string like '5GB'")
    if value <= 0:
        raise ConfigError(f"{key}: {size!r} must be positive")
    return value


def has_nonfinite(tensor: torch.Tensor, chunk: int = 1 << 18) -> bool:
    """True if a floating tensor holds NaN/Inf; checked in chunks so the mask stays small."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return False
    flat = tensor.reshape(-1)
    return any(not bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def preview(names: list[str]) -> str:
    shown = ", ".join(names[:LIST_LIMIT])
    return shown + (f" ... (+{len(names) - LIST_LIMIT} more)" if len(names) > LIST_LIMIT else "")


# ------------------------------------------------------------------------------ the header reader


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives, from the file header (no data read)."""

    path: str
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class _Corrupt(Exception):
    pass


def read_header(path: str) -> dict[str, TensorEntry]:
    """Parse and sanity-check a safetensors header: name -> TensorEntry, in file order.

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
        data_start = 8 + header_size
        data_size = file_size - data_start
        entries: dict[str, TensorEntry] = {}
        largest_end, largest_name = 0, None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, start, end = _parse_entry(name, entry)
            if end > largest_end:
                largest_end, largest_name = end, name
            entries[name] = TensorEntry(path, dtype, shape, data_start + start, data_start + end)
    except _Corrupt as error:
        raise WeightsError(f"weights file {path} is corrupt: {error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"weights file {path} is corrupt: header is not valid JSON ({error})") from None
    if largest_end > data_size:
        raise WeightsError(
            f"weights file {path} is truncated: tensor {largest_name} ends at data byte {largest_end} "
            f"but the file holds only {data_size} data bytes ({file_size} bytes in all)"
        )
    return dict(sorted(entries.items(), key=lambda item: item[1].begin))


def _parse_entry(name: str, entry) -> tuple[str, tuple[int, ...], int, int]:
    try:
        dtype = entry["dtype"]
        shape = tuple(entry["shape"])
        start, end = entry["data_offsets"]
        valid = (
            isinstance(dtype, str)
            and all(isinstance(dim, int) and dim >= 0 for dim in shape)
            and isinstance(start, int)
            and isinstance(end, int)
            and 0 <= start <= end
        )
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise _Corrupt(f"tensor {name} has a bad header entry {entry!r}")
    if dtype not in DTYPES:
        raise _Corrupt(f"tensor {name} has dtype {dtype}, which this torch cannot load")
    expected = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
    if end - start != expected:
        raise _Corrupt(f"tensor {name} spans {end - start} bytes but shape {list(shape)} {dtype} needs {expected}")
    return dtype, shape, start, end


# ------------------------------------------------------------------------------ folder inspection


def inspect_folder(folder: str | os.PathLike) -> dict[str, TensorEntry]:
    """Validate a weights folder from its index and headers; tensor name -> TensorEntry."""
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise WeightsError(f"weights folder {folder} does not exist")
    if not os.path.isdir(folder):
        raise WeightsError(f"weights path {folder} is a file, not a model folder")

    single = os.path.join(folder, SAFE_WEIGHTS_NAME)
    index_path = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    # Same precedence as transformers: the single file first, then the index.
    if os.path.isfile(single):
        return read_header(single)
    if os.path.isfile(index_path):
        return _inspect_index(folder, index_path)

    pickles = [name for name in _PICKLE_WEIGHT_NAMES if os.path.exists(os.path.join(folder, name))]
    pickles += sorted(
        entry for entry in os.listdir(folder) if re.fullmatch(r"pytorch_model-\d{5}-of-\d{5}\.bin", entry)
    )[:1]
    hint = f"; found {', '.join(pickles)}: pickle weights are not loaded, convert to safetensors" if pickles else ""
    raise WeightsError(f"no weights in {folder}: expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}{hint}")


def _inspect_index(folder: str, index_path: str) -> dict[str, TensorEntry]:
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
            f'weights index {index_path} is malformed: expected {{"weight_map": {{"tensor name": "file name", ...}}}}'
        )
    names_by_file: dict[str, list[str]] = defaultdict(list)
    for name, file_name in weight_map.items():
        names_by_file[file_name].append(name)
    entries: dict[str, TensorEntry] = {}
    for file_name, names in names_by_file.items():
        path = os.path.join(folder, file_name)
        if os.path.basename(file_name) != file_name or not os.path.isfile(path):
            raise WeightsError(
                f"weights index {index_path} maps {len(names)} tensors (e.g. {names[0]}) to "
                f"{file_name}, which is missing from {folder}"
            )
        header = read_header(path)
        for name in names:  # an index may list a file's tensors only in part
            if name not in header:
                raise WeightsError(f"weights index {index_path} maps tensor {name} to {path}, which has no such tensor")
            entries[name] = header[name]
    return entries


def read_weight_map(folder: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> path of the safetensors file holding it (folder, index and headers validated)."""
    return {name: entry.path for name, entry in inspect_folder(folder).items()}


# ------------------------------------------------------------------------------ streaming reads


def read_tensor(handle, entry: TensorEntry, name: str) -> torch.Tensor:
    """One tensor into its own buffer (freed when the caller drops it)."""
    dtype = entry.torch_dtype
    if entry.end == entry.begin:
        return torch.empty(entry.shape, dtype=dtype)
    buffer = bytearray(entry.end - entry.begin)
    handle.seek(entry.begin)
    if handle.readinto(buffer) != len(buffer):
        raise WeightsError(f"{entry.path}: truncated while reading tensor {name}")
    return torch.frombuffer(buffer, dtype=dtype).reshape(entry.shape)


def iter_safetensors_file(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of one file, in file order, each read on its own."""
    entries = read_header(path)
    with open(path, "rb") as handle:
        for name, entry in entries.items():
            yield name, read_tensor(handle, entry, name)


@dataclass(frozen=True)
class StoredTensor:
    """A tensor still in its safetensors file, read only when written (see `ShardWriter.add`).

    It answers what the export's checks and casts ask of a tensor (`shape`, `dtype`,
    `is_floating_point`, `to(dtype)`, `float()`), so an unchanged base weight streams from the
    source file to the export in row blocks: a 2 GB embedding never sits whole in memory.
    """

    entry: TensorEntry
    name: str
    cast: torch.dtype | None = None  # the dtype it is written in; None: as stored

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.entry.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.cast or self.entry.torch_dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.entry.shape) * self.dtype.itemsize

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def to(self, dtype: torch.dtype) -> StoredTensor:
        return replace(self, cast=dtype)

    def float(self) -> StoredTensor:
        return self.to(torch.float32)

    def load(self) -> torch.Tensor:
        """The whole tensor in memory, in `dtype` (for a weight that is changed, e.g. merged)."""
        with open(self.entry.path, "rb") as handle:
            return read_tensor(handle, self.entry, self.name).to(self.dtype)

    def blocks(self, max_bytes: int = 64 << 20) -> Iterator[torch.Tensor]:
        """The tensor in row blocks of about `max_bytes` as stored, each cast to `dtype`."""
        entry = self.entry
        rows = entry.shape[0] if entry.shape else 1
        row_bytes = (entry.end - entry.begin) // max(rows, 1)
        step = max(1, max_bytes // max(row_bytes, 1))
        with open(entry.path, "rb") as handle:
            for first in range(0, rows, step):
                count = min(step, rows - first)
                begin = entry.begin + first * row_bytes
                block = replace(entry, shape=(count, *entry.shape[1:]), begin=begin, end=begin + count * row_bytes)
                if not entry.shape:
                    block = entry
                yield read_tensor(handle, block, self.name).to(self.dtype)


def materialize(tensor: torch.Tensor | StoredTensor) -> torch.Tensor:
    return tensor.load() if isinstance(tensor, StoredTensor) else tensor


def iter_weights_folder(folder: str | os.PathLike, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for a whole HF weights folder (single file or shards), validated first.

    lazy=True yields `StoredTensor`s: nothing is read until the consumer reads it.
    """
    by_file: dict[str, list[tuple[str, TensorEntry]]] = defaultdict(list)
    for name, entry in inspect_folder(folder).items():
        by_file[entry.path].append((name, entry))
    for path, items in by_file.items():
        items = sorted(items, key=lambda item: item[1].begin)
        if lazy:
            yield from ((name, StoredTensor(entry, name)) for name, entry in items)
            continue
        with open(path, "rb") as handle:
            for name, entry in items:
                yield name, read_tensor(handle, entry, name)


# ------------------------------------------------------------------------------ writing


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw bytes without a copy (bf16 has no numpy dtype, so go through uint8)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _entry_json(name: str, dtype: torch.dtype, shape, begin: int, end: int) -> str:
    if dtype not in TAGS:
        raise WeightsError(f"cannot save {name}: dtype {dtype} has no safetensors tag")
    entry = {"dtype": TAGS[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    return json.dumps({name: entry}, separators=(",", ":"))[1:-1]


class _SafetensorsFile:
    """One safetensors file written as tensors arrive: data first, header last into reserved space.

    `reserve` bytes (a multiple of 8, the format's alignment) are kept after the length field; the
    header written there at `finish()` is padded with spaces to fill them. `fits` says whether one
    more tensor's header entry still has room.
    """

    def __init__(self, path: str, metadata: Mapping | None, reserve: int):
        self.path = path
        self.reserve = reserve + (-reserve % 8)
        self.metadata = dict(metadata or {"format": "pt"})
        self.entries: list[str] = []
        self.names: list[str] = []
        self.header_bytes = len(json.dumps({"__metadata__": self.metadata}, separators=(",", ":")))
        self.size = 0
        with disk_errors(path):
            self.handle = open(path, "wb")  # noqa: SIM115 - closed in finish() / discard()
            self.handle.seek(8 + self.reserve)

    def fits(self, name: str, dtype: torch.dtype, shape, nbytes: int) -> bool:
        entry = _entry_json(name, dtype, shape, self.size, self.size + nbytes)
        return self.header_bytes + 1 + len(entry.encode("utf-8")) <= self.reserve

    def write(self, name: str, tensor: torch.Tensor | StoredTensor) -> None:
        nbytes = tensor.nbytes
        entry = _entry_json(name, tensor.dtype, tensor.shape, self.size, self.size + nbytes)
        with disk_errors(self.path):
            if isinstance(tensor, StoredTensor):
                for block in tensor.blocks():
                    self.handle.write(_tensor_bytes(block))
                    del block
            else:
                self.handle.write(_tensor_bytes(tensor))
        self.entries.append(entry)
        self.names.append(name)
        self.header_bytes += 1 + len(entry.encode("utf-8"))
        self.size += nbytes

    def finish(self) -> None:
        meta = json.dumps({"__metadata__": self.metadata}, separators=(",", ":"))
        header = ("{" + ",".join([meta[1:-1], *self.entries]) + "}").encode("utf-8")
        if len(header) > self.reserve:  # fits() is asked first; this cannot happen
            raise WeightsError(f"{self.path}: header of {len(header)} bytes overflows its {self.reserve}")
        with disk_errors(self.path), self.handle:
            self.handle.seek(0)
            self.handle.write(struct.pack("<Q", self.reserve))
            self.handle.write(header + b" " * (self.reserve - len(header)))
            fsync_file(self.handle)

    def discard(self) -> None:
        self.handle.close()
        _remove_if_present(self.path)


def _exact_reserve(tensors: Mapping[str, torch.Tensor], metadata: Mapping | None) -> int:
    """The header size of `tensors` written in order (what safetensors itself would write)."""
    offset, entries = 0, []
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        entries.append(_entry_json(name, tensor.dtype, tensor.shape, offset, offset + nbytes))
        offset += nbytes
    meta = json.dumps({"__metadata__": dict(metadata or {"format": "pt"})}, separators=(",", ":"))
    return len(("{" + ",".join([meta[1:-1], *entries]) + "}").encode("utf-8"))


def header_reserve(names, metadata: Mapping | None = None) -> int:
    """Room for the header of any subset of `names` (2-D shapes and 12-digit offsets: 128 bytes
    besides the name each), so a streamed shard never has to be closed early for its header."""
    meta = len(json.dumps({"__metadata__": dict(metadata or {"format": "pt"})}))
    return meta + sum(len(json.dumps(name)) + 128 for name in names)


def write_safetensors_file(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> None:
    """Write `tensors` (CPU, contiguous) in safetensors format, straight from their memory, fsynced."""
    part = _SafetensorsFile(path, metadata, _exact_reserve(tensors, metadata))
    try:
        for name, tensor in tensors.items():
            part.write(name, tensor)
        part.finish()
    except BaseException:
        part.discard()
        raise


class ShardWriter:
    """Streams tensors into `folder` as HF shards of at most `max_shard_size` bytes.

    Each tensor is written to its shard's file when it arrives (memory holds one tensor, or one
    row block of a `StoredTensor`). Use as a context manager, or call `close()` (names the files,
    writes the index, removes weight files of an earlier save that the new one does not reference)
    / `abort()` (removes the part files written so far). `header_reserve`: bytes kept for each
    shard's header (`header_reserve(names)` when the names are known; a shard whose header is full
    is closed and the next one started). Tensors that alias each other are fine: each is written
    on its own.
    """

    def __init__(
        self,
        folder: str,
        max_shard_size: int | str = "5GB",
        metadata: Mapping | None = None,
        header_reserve: int = 64 << 10,
    ):
        self.folder = os.fspath(folder)
        self.limit = parse_size(max_shard_size)
        self.metadata = metadata
        self.reserve = header_reserve
        self._current: _SafetensorsFile | None = None
        self._created: list[str] = []  # every part file opened, for abort()
        self._parts: list[_SafetensorsFile] = []  # finished, in the order their final names follow
        self._seen: set[str] = set()
        self.total_size = 0
        with disk_errors(self.folder):
            os.makedirs(self.folder, exist_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor | StoredTensor) -> None:
        if not isinstance(tensor, (torch.Tensor, StoredTensor)):
            raise WeightsError(f"cannot save {name}: it is a {type(tensor).__name__}, not a tensor")
        if isinstance(tensor, torch.Tensor):
            if tensor.is_meta:
                raise WeightsError(f"cannot save {name}: it is on the meta device (no data)")
            tensor = tensor.detach().to("cpu").contiguous()
        if name in self._seen:
            raise WeightsError(f"tensor {name} was produced twice")
        self._seen.add(name)
        size = tensor.nbytes
        self.total_size += size
        first = _entry_json(name, tensor.dtype, tensor.shape, 0, size)
        if size > self.limit:
            part = self._open(first)
            part.write(name, tensor)
            self._finish(part)
        else:
            current = self._current
            if current is not None and (
                current.size + size > self.limit or not current.fits(name, tensor.dtype, tensor.shape, size)
            ):
                self._finish(current)
                self._current = current = None
            if current is None:
                self._current = current = self._open(first)
            current.write(name, tensor)
        del tensor
        if size >= 1 << 20:
            release_free_memory()

    @property
    def names(self) -> set[str]:
        return set(self._seen)

    def _open(self, first_entry: str = "") -> _SafetensorsFile:
        """A new part file; its header has room for at least `first_entry` (a very long name)."""
        path = os.path.join(self.folder, _PART_NAME.format(index=len(self._created)))
        self._created.append(path)
        return _SafetensorsFile(path, self.metadata, max(self.reserve, 2 * len(first_entry.encode("utf-8")) + 256))

    def _finish(self, part: _SafetensorsFile) -> None:
        part.finish()
        self._parts.append(part)

    def abort(self) -> None:
        if self._current is not None:
            self._current.handle.close()
        for path in self._created:
            _remove_if_present(path)
        self._current, self._parts, self._created = None, [], []

    def close(self) -> list[str]:
        """Name the shards, write the index (when sharded); returns the weight file names."""
        try:
            if self._current is None and not self._parts:  # nothing was added: one empty file
                self._current = self._open()
            if self._current is not None:
                self._finish(self._current)
                self._current = None
        except BaseException:
            self.abort()
            raise
        count = len(self._parts)
        names = (
            [SAFE_WEIGHTS_NAME] if count == 1 else [_SHARD_NAME.format(index=i + 1, count=count) for i in range(count)]
        )
        index_path = os.path.join(self.folder, SAFE_WEIGHTS_INDEX_NAME)
        with disk_errors(self.folder):
            if count > 1:
                # A stale single file would win over the new index (transformers looks for it first).
                _remove_if_present(os.path.join(self.folder, SAFE_WEIGHTS_NAME))
            for part, final in zip(self._parts, names):
                os.replace(part.path, os.path.join(self.folder, final))
            if count > 1:
                index = {
                    "metadata": {"total_size": self.total_size},
                    "weight_map": {t: f for f, part in zip(names, self._parts) for t in part.names},
                }
                atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
            else:
                _remove_if_present(index_path)
            for entry in os.listdir(self.folder):  # shards of an earlier, larger save; a killed write's parts
                stale = (_SHARD_RE.fullmatch(entry) and entry not in names) or _STALE_TMP_RE.fullmatch(entry)
                if stale and os.path.isfile(os.path.join(self.folder, entry)):
                    os.remove(os.path.join(self.folder, entry))
        return names


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    metadata: Mapping | None = None,
) -> list[str]:
    """Write a whole state dict as HF safetensors into `folder` (through `ShardWriter`)."""
    reserve = header_reserve(state_dict, metadata)
    with ShardWriter(os.fspath(folder), max_shard_size, metadata, header_reserve=reserve) as writer:
        for name, tensor in state_dict.items():
            writer.add(name, tensor)
        return writer.close()


def is_weight_file(name: str) -> bool:
    """Names a weights folder's own files use (what an overwrite may replace)."""
    return name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME) or bool(_SHARD_RE.fullmatch(name))


def _remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------------ host memory


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None
_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def release_free_memory() -> None:
    """Hand memory freed by dropped tensors back to the OS (glibc keeps it otherwise).

    glibc raises its mmap threshold after a large block is freed, so later tensors of that size
    come from the heap, and the heap's free holes stay in the process's RSS. Trimming after each
    shard keeps a streaming write at about one shard. A no-op off glibc.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def map_large_blocks(threshold: int = 1 << 20) -> None:
    """Serve blocks >= `threshold` bytes with their own mmap, returned to the OS when freed.

    For a process that streams big tensors (export): stops glibc from recycling freed tensors
    through the heap, whose holes stay resident (measured: 60 MB vs 37 MB peak growth for a LoRA
    merge with 20 MB shards) or dequantizes a matrix per matmul (QLoRA). Process-wide: called by the
    export's entry point and when a run quantizes its base. A no-op off glibc.
    """
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, threshold)
