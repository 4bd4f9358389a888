"""Ragged columns (flat values + row offsets) of tokenized rows, gathered and selected without Python loops."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def list_column(ds, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column of a ``datasets.Dataset`` as (flat values, offsets)."""
    col = ds.data.column(name).combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.flatten()
    offsets = offsets - offsets[0]
    if name in ("label_names", "tag_names"):
        return np.asarray(values.to_pylist(), dtype=object), offsets
    return values.to_numpy(zero_copy_only=False), offsets


def take(values: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Select ragged rows ``idx`` from (values, offsets)."""
    idx = np.asarray(idx, dtype=np.int64)
    starts = offsets[idx]
    lens = offsets[idx + 1] - starts
    new_off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    gather = np.repeat(starts - new_off[:-1], lens) + np.arange(new_off[-1], dtype=np.int64)
    return values[gather], new_off


@dataclass
class TokenizedSplit:
    """The valid rows of one split, from every source: per source, a dict of its kept rows' columns
    (ragged ones as (values, offsets), the others as lists)."""

    source: list = field(default_factory=list)  # per row: source name
    row: list = field(default_factory=list)  # per row: 1-based row number
    parts: list = field(default_factory=list)

    def concat(self, name: str):
        vals = [p[name] for p in self.parts]
        if isinstance(vals[0], tuple):
            offs, base = [np.zeros(1, np.int64)], 0
            for _, o in vals:
                offs.append(o[1:] + base)
                base += o[-1]
            return np.concatenate([v for v, _ in vals]), np.concatenate(offs)
        return [x for v in vals for x in v]

    def truncated(self) -> int:
        """How many rows were cut to seq_len (counted per source)."""
        return sum(p["truncated"] for p in self.parts)

    def where(self) -> list[str]:
        """Per row, how an error message names it."""
        return [f"{s} row {r}" for s, r in zip(self.source, self.row)]
