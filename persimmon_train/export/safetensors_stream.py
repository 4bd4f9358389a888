"""Safetensors in and out one tensor at a time, with host memory bounded by one shard.

Why not `safe_open` / `iter_safetensors` for reading: they hand out views of a memory map of the
whole file, and every page touched stays resident (and counted in the process's RSS) until the
file is closed -- streaming a 30 GB single-file checkpoint that way peaks near 30 GB. Here each
tensor is read with a plain `readinto` into its own buffer and freed when the caller drops it.

Why not `save_safetensors` for writing: it plans shards from the complete state dict up front,
and an export that streams cannot hold that. `ShardWriter` fills a shard, writes it, forgets it,
and names the files (`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, or one
`model.safetensors`) when it knows how many there are -- the layout transformers writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import struct
import sys
from collections import defaultdict
from typing import Iterator

import torch

from persimmon_train.checkpoint import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, parse_size, read_weight_map
from persimmon_train.errors import WeightsError

_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TO_TAG = {dtype: tag for tag, dtype in _TO_TORCH.items()}
_SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
_PART_NAME = "part-{index:05d}.safetensors.tmp"


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def release_free_memory() -> None:
    """Hand memory freed by dropped tensors back to the OS (glibc keeps it otherwise).

    glibc raises its mmap threshold after a large block is freed, so later tensors of that size
    come from the heap, and the heap's free holes stay in the process's RSS. Trimming after each
    shard keeps the export's footprint at about one shard. A no-op off glibc.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def map_large_blocks(threshold: int = 1 << 20) -> None:
    """Serve blocks >= `threshold` bytes with their own mmap, returned to the OS when freed.

    For a process that streams big tensors (the export recipe): it stops glibc from moving its
    mmap threshold up and recycling freed tensors through the heap, whose holes stay resident
    (measured: 60 MB vs 37 MB peak growth for a LoRA merge with 20 MB shards). Process-wide, so
    only entry points call it. A no-op off glibc.
    """
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, threshold)


def _read_header(handle) -> tuple[dict, int]:
    (size,) = struct.unpack("<Q", handle.read(8))
    header = json.loads(handle.read(size).decode("utf-8"))
    header.pop("__metadata__", None)
    return header, 8 + size


def iter_safetensors_file(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of one safetensors file, in file order, each read on its own."""
    with open(path, "rb") as handle:
        header, data_start = _read_header(handle)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = _TO_TORCH.get(entry["dtype"])
            if dtype is None:
                raise WeightsError(f"{path}: tensor {name} has dtype {entry['dtype']}, which export does not handle")
            start, end = entry["data_offsets"]
            shape = entry["shape"]
            if end == start:
                yield name, torch.empty(shape, dtype=dtype)
                continue
            buffer = bytearray(end - start)
            handle.seek(data_start + start)
            if handle.readinto(buffer) != len(buffer):
                raise WeightsError(f"{path}: truncated while reading tensor {name}")
            yield name, torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def iter_weights_folder(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for a whole HF weights folder (single file or shards), validated first."""
    by_file: dict[str, list[str]] = defaultdict(list)
    for name, path in read_weight_map(folder).items():  # checks index, headers, truncation
        by_file[path].append(name)
    for path, names in by_file.items():
        wanted = set(names)  # an index may list a file's tensors only in part
        for name, tensor in iter_safetensors_file(path):
            if name in wanted:
                yield name, tensor


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw bytes without a copy (bf16 has no numpy dtype, so go through uint8)."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def write_safetensors_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write `tensors` (CPU, contiguous) in safetensors format, straight from their memory."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _TO_TAG[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in tensors.values():
            handle.write(_tensor_bytes(tensor))
        handle.flush()
        os.fsync(handle.fileno())


class ShardWriter:
    """Collects tensors into shards of at most `max_shard_size` bytes, writing each when full.

    Greedy in arrival order, like transformers' split: a tensor that would overflow the current
    shard starts the next one; a tensor bigger than the limit gets a shard of its own. Write into a
    fresh folder (the exporter uses `<out>.tmp`, renamed when complete): part files carry
    temporary names until `close()` knows the shard count.
    """

    def __init__(self, folder: str, max_shard_size: int | str = "5GB"):
        self.folder = folder
        self.limit = parse_size(max_shard_size)
        self._current: dict[str, torch.Tensor] = {}
        self._current_size = 0
        self._parts: list[list[str]] = []
        self._seen: set[str] = set()
        self.total_size = 0
        os.makedirs(folder, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._seen:
            raise WeightsError(f"export: tensor {name} was produced twice")
        self._seen.add(name)
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        self.total_size += size
        if size > self.limit:
            self._write_part({name: tensor})
            return
        if self._current and self._current_size + size > self.limit:
            self._flush()
        self._current[name] = tensor
        self._current_size += size

    def _flush(self) -> None:
        current, self._current, self._current_size = self._current, {}, 0
        if current:
            self._write_part(current)

    def _write_part(self, tensors: dict[str, torch.Tensor]) -> None:
        path = os.path.join(self.folder, _PART_NAME.format(index=len(self._parts)))
        write_safetensors_file(path, tensors)
        self._parts.append(list(tensors))
        tensors.clear()  # the caller's dict may be the shard itself: drop the tensors before trimming
        release_free_memory()

    @property
    def names(self) -> set[str]:
        return set(self._seen)

    def close(self) -> list[str]:
        """Name the shards, write the index (when sharded); returns the weight file names."""
        self._flush()
        if not self._parts:
            self._write_part({})
        count = len(self._parts)
        names = [SAFE_WEIGHTS_NAME] if count == 1 else [
            _SHARD_NAME.format(index=i + 1, count=count) for i in range(count)]
        for i, final in enumerate(names):
            os.replace(os.path.join(self.folder, _PART_NAME.format(index=i)), os.path.join(self.folder, final))
        if count > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {t: f for f, part in zip(names, self._parts) for t in part}}
            with open(os.path.join(self.folder, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as handle:
                handle.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


@contextlib.contextmanager
def staged_folder(out_dir: str):
    """Yield `<out_dir>.tmp` to write into; on success it replaces `out_dir` whole, on any error it
    is removed. So `out_dir` only ever holds a complete export."""
    out_dir = os.path.abspath(out_dir)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
