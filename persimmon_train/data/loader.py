"""Deterministic, rank-sharded, resumable loaders over prepared (in-memory or memory-mapped) rows.

Sharding: every rank computes the same order of rows for an epoch (a permutation seeded by
``seed + epoch``), cut into global batches of ``world_size * micro_batch_size`` rows (a last,
incomplete global batch is dropped so every rank runs the same number of steps); rank r takes the
r-th ``micro_batch_size`` slice of each global batch. Ranks therefore see disjoint rows and the
same number of batches.

Resuming: ``state_dict()`` is ``{epoch, batch}`` (the next global batch to serve) plus the
settings the order depends on; a fresh loader given that state serves exactly the batches an
uninterrupted run would have served next.

Eval loaders are finite (one pass, no shuffle); so that every rank runs the same number of forward
passes (FSDP needs that), the last batches are topped up with filler rows whose labels are all
-100 (they add nothing to a loss summed over labelled tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from persimmon_train.errors import DataError
from persimmon_train.model.loss import IGNORE_INDEX as IGNORE


class ShardedLoader:
    """Common epoch/batch bookkeeping; subclasses define the epoch's global batches and batch assembly."""

    def __init__(
        self, num_rows: int | None, micro_batch_size: int, seed: int, rank: int, world_size: int, train: bool, what: str
    ):
        """``num_rows``: None for a stream (its length is unknown until it has been read)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_rows = None if num_rows is None else int(num_rows)
        self.micro = int(micro_batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world = int(world_size)
        self.train = train
        self.global_batch = self.micro * self.world
        if train and num_rows is not None and self.num_rows < self.global_batch:
            raise DataError(
                f"{what}: only {self.num_rows} rows, fewer than one global batch "
                f"(micro_batch_size {self.micro} x world_size {self.world}); add data or "
                f"lower data.seq_len / micro_batch_size"
            )
        self.epoch = 0
        self.batch = 0

    # -- order ---------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Global row order for an epoch; -1 marks an eval filler row."""
        raise NotImplementedError

    def _eval_order(self, num_rows: int) -> np.ndarray:
        """Rows 0..num_rows-1 once, topped up with -1 fillers to whole global batches."""
        n_batches = -(-num_rows // self.global_batch)
        order = np.full(n_batches * self.global_batch, -1, dtype=np.int64)
        # Fill rank-major within each global batch so the fillers land at the end of the pass.
        idx = np.arange(num_rows)
        rank_of, pos = idx % self.world, idx // self.world
        b, k = pos // self.micro, pos % self.micro
        order[b * self.global_batch + rank_of * self.micro + k] = idx
        return order

    def _global_batches(self, epoch: int):
        """The epoch's global batches, each ``world_size * micro_batch_size`` rows (-1: eval filler)."""
        order = self._epoch_order(epoch)
        n = len(order) // self.global_batch
        return order[: n * self.global_batch].reshape(n, self.global_batch)

    def __len__(self) -> int:
        return len(self._global_batches(0)) if not self.train else self.num_rows // self.global_batch

    def _make_batch(self, rows) -> dict:
        raise NotImplementedError

    def __iter__(self):
        while True:
            for b, rows in enumerate(self._global_batches(self.epoch)):
                if b < self.batch:
                    continue  # resuming: skip (a stream replays) up to the saved position
                self.batch = b + 1
                yield self._make_batch(rows[self.rank * self.micro : (self.rank + 1) * self.micro])
            if not self.train:
                self.batch = 0  # an eval loader can be iterated again, from the start
                return
            if self.batch == 0:
                raise RuntimeError("the training data yields no complete global batch")
            self.epoch += 1
            self.batch = 0

    # -- resume --------------------------------------------------------------------------------
    def _order_settings(self) -> dict:
        """What the batch order depends on (a stream's unknown length left out)."""
        settings = {"seed": self.seed, "world_size": self.world, "micro_batch_size": self.micro}
        return settings if self.num_rows is None else {**settings, "num_rows": self.num_rows}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, **self._order_settings()}

    def load_state_dict(self, sd: dict) -> None:
        check_same_order(sd, **self._order_settings())
        self.epoch, self.batch = int(sd["epoch"]), int(sd["batch"])


def check_same_order(sd: dict, **mine) -> None:
    """A loader's saved state (`sd`) vs this run's settings the batch order depends on: refuse a change."""
    for key, value in mine.items():
        if key in sd and sd[key] != value:
            raise DataError(
                f"cannot resume the data loader: checkpoint has {key}={sd[key]} but "
                f"this run has {key}={value}; the batches would differ"
            )


class PackedLoader(ShardedLoader):
    """Batches of packed rows: input_ids, labels, position_ids, all [B, seq_len] int64."""

    def __init__(
        self,
        arrays: dict,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        pad_id: int = 0,
        what: str = "train data",
    ):
        self.arrays = arrays
        self.seq_len = arrays["input_ids"].shape[1]
        self.pad_id = pad_id
        super().__init__(arrays["input_ids"].shape[0], micro_batch_size, seed, rank, world_size, train, what)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self.train:
            return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return self._eval_order(self.num_rows)

    def _make_batch(self, rows: np.ndarray) -> dict:
        real = rows >= 0
        ids = np.full((len(rows), self.seq_len), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), self.seq_len), IGNORE, dtype=np.int64)
        pos = np.broadcast_to(np.arange(self.seq_len, dtype=np.int64), ids.shape).copy()
        if real.any():
            r = np.sort(rows[real])  # sorted fancy index reads a memory map sequentially
            back = np.argsort(np.argsort(rows[real]))
            ids[real] = self.arrays["input_ids"][r][back]
            labels[real] = self.arrays["labels"][r][back]
            pos[real] = self.arrays["position_ids"][r][back]
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos),
        }


class PaddedLoader(ShardedLoader):
    """Length-bucketed, right-padded batches for classification / token classification.

    ``examples``: flat ``input_ids`` + ``offsets`` and either per-example ``labels`` ([N] long,
    [N, L] float, [N] float) or per-token ``token_labels`` (flat, aligned with input_ids).
    """

    BUCKET_GLOBAL_BATCHES = 64  # sort lengths within windows of this many global batches

    def __init__(
        self,
        examples: dict,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        pad_id: int = 0,
        pad_to_multiple: int = 8,
        what: str = "train data",
    ):
        self.ex = examples
        self.offsets = examples["offsets"]
        self.lengths = np.diff(self.offsets)
        self.pad_id = pad_id
        self.multiple = pad_to_multiple
        self.per_token = "token_labels" in examples
        super().__init__(len(self.lengths), micro_batch_size, seed, rank, world_size, train, what)
        labels = examples.get("labels")
        # single-label and token labels can carry -100 filler; multi-label / regression cannot
        self.can_fill = self.per_token or (labels is not None and labels.dtype.kind == "i")

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.train:
            by_len = np.argsort(self.lengths, kind="stable")
            if self.can_fill:
                order = self._eval_order(self.num_rows)
                return np.where(order >= 0, by_len[np.maximum(order, 0)], -1)
            # no filler label exists for multi-label / regression: drop the last (< world_size)
            # rows instead, so every rank gets the same number of real rows (and batches)
            n = (self.num_rows // self.world) * self.world
            order = self._eval_order(n)
            return np.where(order >= 0, by_len[np.maximum(order, 0)], -1)
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.num_rows)
        perm = perm[: (len(perm) // self.global_batch) * self.global_batch]
        window = self.global_batch * self.BUCKET_GLOBAL_BATCHES
        chunks = []
        for w in range(0, len(perm), window):
            part = perm[w : w + window]
            chunks.append(part[np.argsort(self.lengths[part], kind="stable")])
        batches = np.concatenate(chunks).reshape(-1, self.global_batch)
        return batches[rng.permutation(len(batches))].reshape(-1)

    def _make_batch(self, rows: np.ndarray) -> dict:
        if not self.can_fill:
            rows = rows[rows >= 0]
        real_rows = rows[rows >= 0]
        longest = int(self.lengths[real_rows].max()) if len(real_rows) else 1
        width = -(-longest // self.multiple) * self.multiple
        width = max(1, min(width, max(longest, int(self.lengths.max()))))
        B = len(rows)
        ids = np.full((B, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, width), dtype=np.int64)
        if self.per_token:
            labels = np.full((B, width), IGNORE, dtype=np.int64)
        else:
            lab = self.ex["labels"]
            labels = np.full((B,) + lab.shape[1:], IGNORE if lab.dtype.kind == "i" else 0, dtype=lab.dtype)
        for b, r in enumerate(rows.tolist()):
            if r < 0:
                ids[b, 0] = self.pad_id  # filler: one pad token, label ignored
                mask[b, 0] = 1
                continue
            a, e = int(self.offsets[r]), int(self.offsets[r + 1])
            ids[b, : e - a] = self.ex["input_ids"][a:e]
            mask[b, : e - a] = 1
            if self.per_token:
                labels[b, : e - a] = self.ex["token_labels"][a:e]
            else:
                labels[b] = self.ex["labels"][r]
        out_labels = torch.from_numpy(labels)
        if out_labels.dtype == torch.float64:
            out_labels = out_labels.float()
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "labels": out_labels}


@dataclass
class DataBundle:
    """What build_data gives a run: its loaders, and the labels a classification head needs."""

    train_loader: object
    eval_loader: object | None
    num_labels: int | None = None
    id2label: dict | None = None
    label2id: dict | None = None
    problem_type: str | None = None
    stats: dict = field(default_factory=dict)
