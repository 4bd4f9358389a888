"""Preparation of data.format classification: one label (or label set, or value) per example, and
the label space it shares with token classification (names fixed by config or ClassLabel
features, or collected from the training rows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from persimmon_train.data.config import DataConfig
from persimmon_train.data.ragged import TokenizedSplit, list_column, take
from persimmon_train.errors import DataError

PROBLEM_OF_KIND = {
    "name": "single_label_classification",
    "id": "single_label_classification",
    "multi": "multi_label_classification",
    "float": "regression",
}


def shown(name: str) -> str:
    """A label name as an error message shows it (``#3`` is integer id 3)."""
    return f"id {name[1:]}" if name.startswith("#") else repr(name)


class LabelSpace:
    """Label set and problem type, fixed by config / ClassLabel features or collected from train."""

    def __init__(self, cfg: DataConfig, fixed: list[str] | None):
        self.cfg = cfg
        self.problem_type = cfg.problem_type
        self.names: list[str] | None = list(fixed) if fixed else None

    def collect(self, kinds, names_lists, where, bad, learn: bool) -> list[bool]:
        """Settle the problem type and (unless fixed) the label names; return rows that fit."""
        c = self.cfg
        ok = []
        if self.problem_type is None and kinds:
            self.problem_type = PROBLEM_OF_KIND[kinds[0]]
        seen_names, max_id, uses = set(), -1, set()
        for kind, names, w in zip(kinds, names_lists, where):
            expected = self.problem_type
            fits = PROBLEM_OF_KIND[kind] == expected or (
                expected == "multi_label_classification" and kind in ("name", "id")
            )
            if not fits:
                bad(
                    f"{w}, field '{c.label_field}': a {kind} label, but the labels of this data set "
                    f"are {expected} (set by the first row or data.problem_type)"
                )
                ok.append(False)
                continue
            for n in names:
                if n.startswith("#"):
                    max_id, _ = max(max_id, int(n[1:])), uses.add("id")
                else:
                    seen_names.add(n)
                    uses.add("name")
            ok.append(True)
        if learn and self.names is None and self.problem_type != "regression":
            if uses == {"name", "id"}:
                raise DataError(
                    f"{where[0].split(' row ')[0]}: field '{c.label_field}' mixes label "
                    f"names and integer ids; use one or set data.labels"
                )
            self.names = sorted(seen_names) if "name" in uses else [str(i) for i in range(max_id + 1)]
        return ok

    def id_of(self, name: str) -> int | None:
        if name.startswith("#"):
            i = int(name[1:])
            return i if i < len(self.names) else None
        return self.label2id.get(name)

    @property
    def label2id(self) -> dict:
        if not hasattr(self, "_l2i"):
            self._l2i = {n: i for i, n in enumerate(self.names or [])}
        return self._l2i


class ClassificationPreparation:
    """Writes ``<split>_{input_ids,offsets,labels}.npy`` (examples read by PaddedLoader)."""

    label_field = "label_field"  # the DataConfig key naming the rows' label column

    def __init__(self, cfg: DataConfig, fixed_labels: list[str] | None):
        self.cfg = cfg
        self.space = LabelSpace(cfg, fixed_labels)

    @classmethod
    def fixed_labels(cls, cfg: DataConfig, source) -> list[str] | None:
        """The names a ClassLabel column (parquet / save_to_disk / hub) carries."""
        feature = (getattr(source.dataset, "features", None) or {}).get(getattr(cfg, cls.label_field))
        feature = getattr(feature, "feature", feature)  # Sequence/List(ClassLabel) for tags or multi-label
        names = getattr(feature, "names", None)
        return list(names) if names else None

    @staticmethod
    def columns(mapped, idx: np.ndarray) -> dict:
        names, noff = list_column(mapped, "label_names")
        return {
            "label_names": [list(names[noff[j] : noff[j + 1]]) for j in idx],
            "label_kind": np.asarray(mapped["label_kind"], dtype=object)[idx].tolist(),
            "label_float": np.asarray(mapped["label_float"], dtype=np.float64)[idx].tolist(),
            "truncated": int(np.asarray(mapped["truncated"], dtype=bool)[idx].sum()),
        }

    def save(self, split: str, data: TokenizedSplit, bad, out: Path, pad_id: int) -> dict:
        space, where = self.space, data.where()
        ids, offsets = data.concat("input_ids")
        kinds, names_lists = data.concat("label_kind"), data.concat("label_names")
        floats = np.asarray(data.concat("label_float"), dtype=np.float64)
        ok = space.collect(kinds, names_lists, where, bad, learn=split == "train")
        keep, labels = [], []
        for j, (good, names) in enumerate(zip(ok, names_lists)):
            if not good:
                continue
            if space.problem_type == "regression":
                labels.append(floats[j])
                keep.append(j)
                continue
            lids = [space.id_of(n) for n in names]
            if any(x is None for x in lids):
                bad(
                    f"{where[j]}, field '{self.cfg.label_field}': label {shown(names[lids.index(None)])} is not in "
                    f"the label set {space.names} (collected from the training data; set data.labels to fix it)"
                )
                continue
            if space.problem_type == "multi_label_classification":
                hot = np.zeros(len(space.names), np.float32)
                hot[lids] = 1.0
                labels.append(hot)
            else:
                labels.append(lids[0])
            keep.append(j)
        ids, offsets = take(ids, offsets, np.asarray(keep, dtype=np.int64))
        dtype = np.int64 if space.problem_type == "single_label_classification" else np.float32
        lab = np.asarray(labels, dtype=dtype)
        if space.problem_type == "multi_label_classification":
            lab = lab.reshape(len(keep), len(space.names))
        np.save(out / f"{split}_labels.npy", lab)
        np.save(out / f"{split}_input_ids.npy", ids.astype(np.int32))
        np.save(out / f"{split}_offsets.npy", offsets)
        return {"examples": len(keep), "tokens": int(offsets[-1]), "truncated": data.truncated()}

    def labels(self) -> dict:
        regression = self.space.problem_type == "regression"
        return {"problem_type": self.space.problem_type, "names": None if regression else self.space.names}
