"""Packed loader over a streamed corpus (larger than memory).

Documents are read source after source, in order, tokenized on the fly and packed best-fit-
decreasing within windows of ``stream_buffer_rows`` rows' worth of tokens (a whole-corpus
best fit needs the whole corpus; a window of 64 x 16K tokens already packs to > 99%). Rows of a
window are shuffled with a generator seeded by (seed, epoch, window) and cut into global batches
exactly as the map-style loader does; every rank reads the whole stream and keeps its own slice,
so ranks stay disjoint and in step without knowing the corpus size. Resuming replays the stream
up to the saved batch (tokenization is repeated, nothing is stored).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from persimmon_train.data.loader import ShardedLoader
from persimmon_train.data.packing import IGNORE, PackStats, pack

log = logging.getLogger(__name__)


class StreamingPackedLoader(ShardedLoader):
    """The sharded loader's slicing, eval filling and resume checks over global batches of streamed rows."""

    def __init__(
        self,
        documents,
        *,
        seq_len: int,
        pad_id: int,
        long_docs: str,
        buffer_rows: int,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
    ):
        """``documents()``: a callable returning a fresh iterator of (input_ids, labels) lists."""
        self.documents = documents
        self.seq_len, self.pad_id, self.long_docs = seq_len, pad_id, long_docs
        self.buffer_tokens = max(1, buffer_rows) * seq_len
        self.stats = PackStats()
        super().__init__(None, micro_batch_size, seed, rank, world_size, train, "streamed data")

    def _windows(self, epoch: int):
        ids, labels, lengths, tokens, w = [], [], [], 0, 0
        stats = PackStats()

        def flush():
            nonlocal ids, labels, lengths, tokens, w
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            rows, st = pack(
                np.concatenate(ids), np.concatenate(labels), offsets, self.seq_len, self.pad_id, self.long_docs
            )
            stats.add(st)
            n = rows["input_ids"].shape[0]
            order = np.random.default_rng([self.seed, epoch, w]).permutation(n) if self.train else np.arange(n)
            ids, labels, lengths, tokens, w = [], [], [], 0, w + 1
            return [{k: v[i] for k, v in rows.items()} for i in order]

        for doc_ids, doc_labels in self.documents():
            ids.append(np.asarray(doc_ids, dtype=np.int32))
            labels.append(np.asarray(doc_labels, dtype=np.int32))
            lengths.append(len(doc_ids))
            tokens += len(doc_ids)
            if tokens >= self.buffer_tokens:
                yield from flush()
        if lengths:
            yield from flush()
        self.stats = stats

    def _filler(self) -> dict:
        return {
            "input_ids": np.full(self.seq_len, self.pad_id, np.int32),
            "labels": np.full(self.seq_len, IGNORE, np.int32),
            "position_ids": np.arange(self.seq_len, dtype=np.int32),
        }

    def _global_batches(self, epoch: int):
        pending = []
        for row in self._windows(epoch):
            pending.append(row)
            if len(pending) == self.global_batch:
                yield pending
                pending = []
        if pending and not self.train:  # eval: keep every row, top up with ignored fillers
            order = self._eval_order(len(pending))
            yield [pending[i] if i >= 0 else self._filler() for i in order]

    def _make_batch(self, rows: list[dict]) -> dict:
        return {
            k: torch.from_numpy(np.stack([r[k] for r in rows]).astype(np.int64))
            for k in ("input_ids", "labels", "position_ids")
        }
