"""Preparation of data.format token_classification: a tag on each word's first sub-token (the
label space as in classification)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from persimmon_train.data.prepare_classification import ClassificationPreparation, shown
from persimmon_train.data.ragged import TokenizedSplit, list_column, take
from persimmon_train.errors import DataError
from persimmon_train.model.loss import IGNORE_INDEX as IGNORE


class TokenClassificationPreparation(ClassificationPreparation):
    """Writes ``<split>_{input_ids,offsets,token_labels}.npy`` (examples read by PaddedLoader)."""

    label_field = "tags_field"

    @staticmethod
    def columns(mapped, idx: np.ndarray) -> dict:
        return {
            "tag_names": take(*list_column(mapped, "tag_names"), idx),
            "truncated": int(np.asarray(mapped["truncated"], dtype=bool)[idx].sum()),
        }

    def _learn_tags(self, train_tags: np.ndarray) -> None:
        """Unless fixed, the tag set: the training data's tag names, sorted, or ids 0..max."""
        names = {t for t in train_tags.tolist() if t}
        ids = {n for n in names if n.startswith("#")}
        if ids and ids != names:
            raise DataError(
                f"field '{self.cfg.tags_field}' mixes tag names and integer ids; use one or set data.labels"
            )
        self.space.names = [str(i) for i in range(max(int(n[1:]) for n in ids) + 1)] if ids else sorted(names)

    def save(self, split: str, data: TokenizedSplit, bad, out: Path, pad_id: int) -> dict:
        space, where = self.space, data.where()
        ids, offsets = data.concat("input_ids")
        tags, _ = data.concat("tag_names")
        if split == "train" and space.names is None:  # train comes first: eval rows use its tag set
            self._learn_tags(tags)
        tag_ids = np.full(len(tags), IGNORE, dtype=np.int64)
        doc_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        keep_doc = np.ones(len(offsets) - 1, dtype=bool)
        for k, t in enumerate(tags.tolist()):
            if t:
                i = space.id_of(t)
                if i is None:
                    j = int(doc_of[k])
                    if keep_doc[j]:
                        bad(
                            f"{where[j]}, field '{self.cfg.tags_field}': tag {shown(t)} is not in the tag "
                            f"set {space.names} (collected from the training data; set data.labels)"
                        )
                        keep_doc[j] = False
                else:
                    tag_ids[k] = i
        idx = np.nonzero(keep_doc)[0]
        tag_ids, _ = take(tag_ids, offsets, idx)
        ids, offsets = take(ids, offsets, idx)
        np.save(out / f"{split}_input_ids.npy", ids.astype(np.int32))
        np.save(out / f"{split}_offsets.npy", offsets)
        np.save(out / f"{split}_token_labels.npy", tag_ids)
        return {"examples": int(len(idx)), "tokens": int(offsets[-1]), "truncated": data.truncated()}

    def labels(self) -> dict:
        return {"problem_type": None, "names": None if self.space.problem_type == "regression" else self.space.names}
