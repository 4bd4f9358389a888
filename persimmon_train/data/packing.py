"""Pack tokenized documents into rows of exactly ``seq_len`` tokens, documents kept whole.

A row holds whole documents back to back. ``position_ids`` restart at 0 at each document start,
which is how the model knows where a document begins (no token attends across documents). Labels
are already -100 at each document's first token (see formats.py); padding at the end of a row is
``pad_id`` with labels -100 and positions 0, 1, 2, ... (a "document" of its own, never trained).

Documents longer than ``seq_len`` are split into ``seq_len`` pieces (each piece is a document of
its own, its first label set to -100) or dropped, and counted either way.

Bins are filled best-fit-decreasing: documents sorted longest first, each placed in the open row
whose free space is the smallest that still fits it. Free-space values are integers in
[0, seq_len], so the open rows are kept in buckets by free space plus one sorted list of the
non-empty free-space values: a bisect finds the best row in O(log seq_len).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from persimmon_train.model.loss import IGNORE_INDEX as IGNORE


@dataclass
class PackStats:
    documents: int = 0
    split_documents: int = 0  # documents longer than seq_len that were split
    dropped_documents: int = 0  # ... or dropped
    dropped_tokens: int = 0
    rows: int = 0
    real_tokens: int = 0
    padding_tokens: int = 0

    @property
    def efficiency(self) -> float:
        total = self.real_tokens + self.padding_tokens
        return self.real_tokens / total if total else 0.0

    def add(self, other: PackStats) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["efficiency"] = round(self.efficiency, 6)
        return d


def segments_for(lengths: np.ndarray, seq_len: int, long_docs: str, stats: PackStats):
    """Cut documents into pieces of at most seq_len: returns (doc_index, start, length) arrays."""
    lengths = np.asarray(lengths, dtype=np.int64)
    stats.documents += int(len(lengths))
    long = lengths > seq_len
    if not long.any():
        idx = np.arange(len(lengths), dtype=np.int64)
        return idx, np.zeros_like(idx), lengths
    if long_docs == "drop":
        stats.dropped_documents += int(long.sum())
        stats.dropped_tokens += int(lengths[long].sum())
        idx = np.nonzero(~long)[0]
        return idx, np.zeros_like(idx), lengths[idx]
    stats.split_documents += int(long.sum())
    pieces = -(-lengths // seq_len)  # ceil
    doc = np.repeat(np.arange(len(lengths), dtype=np.int64), pieces)
    first = np.cumsum(pieces) - pieces
    k = np.arange(len(doc), dtype=np.int64) - np.repeat(first, pieces)
    start = k * seq_len
    seg_len = np.minimum(seq_len, lengths[doc] - start)
    return doc, start, seg_len


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Group item indices into bins of ``capacity`` (every length <= capacity). Deterministic."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    buckets: dict[int, list[int]] = {}  # free space -> bins with that free space
    free_values: list[int] = []  # sorted non-empty keys of buckets
    for i, n in zip(order.tolist(), lengths[order].tolist()):
        if n <= 0:
            continue
        k = bisect.bisect_left(free_values, n)
        if k == len(free_values):
            b = len(bins)
            bins.append([i])
            free = capacity - n
        else:
            free_now = free_values[k]
            stack = buckets[free_now]
            b = stack.pop()
            if not stack:
                del buckets[free_now]
                free_values.pop(k)
            bins[b].append(i)
            free = free_now - n
        if free > 0:
            stack = buckets.get(free)
            if stack is None:
                buckets[free] = [b]
                bisect.insort(free_values, free)
            else:
                stack.append(b)
    return bins


def pack(
    input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, seq_len: int, pad_id: int, long_docs: str = "split"
) -> tuple[dict, PackStats]:
    """Pack documents given as flat token/label arrays plus offsets (len = docs + 1).

    Returns ``{"input_ids", "labels", "position_ids"}`` int32 arrays of shape [rows, seq_len].
    """
    stats = PackStats()
    lengths = np.diff(offsets)
    doc, start, seg_len = segments_for(lengths, seq_len, long_docs, stats)
    bins = best_fit_decreasing(seg_len, seq_len)
    rows = len(bins)
    out_ids = np.full((rows, seq_len), pad_id, dtype=np.int32)
    out_labels = np.full((rows, seq_len), IGNORE, dtype=np.int32)
    out_pos = np.empty((rows, seq_len), dtype=np.int32)
    ar = np.arange(seq_len, dtype=np.int32)
    seg_begin = offsets[doc] + start
    for r, members in enumerate(bins):
        col = 0
        for s in members:
            a, n = int(seg_begin[s]), int(seg_len[s])
            out_ids[r, col : col + n] = input_ids[a : a + n]
            out_labels[r, col : col + n] = labels[a : a + n]
            out_labels[r, col] = IGNORE  # a document (or split piece) never predicts its first token
            out_pos[r, col : col + n] = ar[:n]
            col += n
        out_pos[r, col:] = ar[: seq_len - col]
        stats.padding_tokens += seq_len - col
        stats.real_tokens += col
    stats.rows = rows
    return {"input_ids": out_ids, "labels": out_labels, "position_ids": out_pos}, stats
