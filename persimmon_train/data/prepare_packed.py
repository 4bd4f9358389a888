"""Preparation of data.format text / chat: documents packed best-fit into rows of seq_len tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from persimmon_train.data.config import DataConfig
from persimmon_train.data.packing import pack
from persimmon_train.data.ragged import TokenizedSplit, list_column, take


class PackedPreparation:
    """Writes ``<split>_{input_ids,labels,position_ids}.npy`` (rows read by PackedLoader)."""

    def __init__(self, cfg: DataConfig, fixed_labels: list[str] | None):
        self.cfg = cfg

    @staticmethod
    def fixed_labels(cfg: DataConfig, source) -> None:
        return None  # no labels beyond the tokens

    @staticmethod
    def columns(mapped, idx: np.ndarray) -> dict:
        return {"labels": take(*list_column(mapped, "labels"), idx)}

    def save(self, split: str, data: TokenizedSplit, bad, out: Path, pad_id: int) -> dict:
        ids, offsets = data.concat("input_ids")
        rows, stats = pack(ids, data.concat("labels")[0], offsets, self.cfg.seq_len, pad_id, self.cfg.long_docs)
        for name, arr in rows.items():
            np.save(out / f"{split}_{name}.npy", arr)
        return stats.as_dict()

    def labels(self) -> None:
        return None
