"""Preference pairs (DPO, reward models): rows -> chosen/rejected documents -> packed rows.

A row is ``{"prompt", "chosen", "rejected"}`` (strings, optional ``system``) or
``{"chosen": [messages], "rejected": [messages]}`` whose messages agree up to the last assistant
message. Both sides are tokenised with the SFT chat format (`Tokenizer.encode_chat`), so the
tokens a model is tuned on are the tokens it generates after the prompt; labels are the last
response's tokens (its eos included), -100 elsewhere.

Packing: chosen and rejected of a pair are two documents of the same row (positions restart at
each, so no token attends across them, as in SFT packing), and a row holds whole pairs only
(best-fit-decreasing over pair lengths). ``doc_ids`` marks each token's document within its row:
``2k`` for the k-th pair's chosen, ``2k + 1`` for its rejected, -1 for padding. A pair longer than
``seq_len`` has its prompt cut from the left (``data.long_docs=split``; dropped if the responses
alone do not fit) or is dropped (``drop``), and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from persimmon_train.data.config import DataConfig
from persimmon_train.data.formats import BadRow, BadRows, RowProcessor, _type_name, get_list, get_string
from persimmon_train.data.loader import PackedLoader
from persimmon_train.data.packing import best_fit_decreasing
from persimmon_train.data.sources import load_source, resolve
from persimmon_train.data.tokenizer import Tokenizer
from persimmon_train.errors import DataError
from persimmon_train.model.loss import IGNORE_INDEX as IGNORE

log = logging.getLogger(__name__)

CHOSEN, REJECTED = "chosen", "rejected"
CACHE_VERSION = 1
ARRAYS = ("input_ids", "labels", "position_ids", "doc_ids")


@dataclass
class PairStats:
    pairs: int = 0
    truncated_pairs: int = 0  # prompt cut from the left to fit seq_len
    dropped_pairs: int = 0
    rows: int = 0
    real_tokens: int = 0
    padding_tokens: int = 0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        total = self.real_tokens + self.padding_tokens
        d["efficiency"] = round(self.real_tokens / total, 6) if total else 0.0
        return d


class PreferenceRowProcessor(RowProcessor):
    """One raw row -> prompt ids (shared) + chosen / rejected response ids, or a BadRow naming the field."""

    def empty(self) -> dict:
        return {"prompt": [], "chosen": [], "rejected": [], "row": 0, "bad": "", "is_eval": False}

    def _messages(self, row: dict, field: str) -> tuple[list[tuple[str, str]], str | None]:
        saved = self.cfg
        self.cfg = replace(saved, messages_field=field)  # error messages name `field`
        try:
            return self._turns(row)
        finally:
            self.cfg = saved

    def _preference(self, row: dict) -> dict:
        c = self.cfg
        for side in (CHOSEN, REJECTED):
            if side not in row or row[side] is None:
                raise BadRow(side, "is missing")
        if isinstance(row[CHOSEN], str) or isinstance(row[REJECTED], str):
            if c.prompt_field not in row:
                raise BadRow(c.prompt_field, "is missing (string 'chosen'/'rejected' need a prompt)")
            prompt = get_string(row, c.prompt_field)
            chosen, rejected = get_string(row, CHOSEN), get_string(row, REJECTED)
            system = row.get(c.system_field)
            if system is not None and not isinstance(system, str):
                raise BadRow(c.system_field, f"expected a string, got {_type_name(system)}")
            prefix, system = [], system or None
        else:
            get_list(row, CHOSEN), get_list(row, REJECTED)
            turns_c, system = self._messages(row, CHOSEN)
            turns_r, system_r = self._messages(row, REJECTED)
            if turns_c[:-1] != turns_r[:-1] or turns_c[-1][0] != turns_r[-1][0] or system != system_r:
                raise BadRow(REJECTED, "does not share the conversation of 'chosen' before the last assistant message")
            prefix, prompt = turns_c[:-1], turns_c[-1][0]
            chosen, rejected = turns_c[-1][1], turns_r[-1][1]
        if chosen == rejected:
            raise BadRow(REJECTED, "is the same as 'chosen' (nothing to prefer)")
        # encode_chat encodes each prompt and response separately: the prompt's ids are the prefix
        # of both sides, and a response's ids are encode(response) + [eos].
        ids, _ = self.tok.encode_chat(prefix + [(prompt, chosen)], system=system, bos=self.add_bos)
        n_chosen = len(self.tok.encode(chosen)) + 1
        prompt_ids = ids[:-n_chosen]
        return {
            "prompt": prompt_ids,
            "chosen": ids[-n_chosen:],
            "rejected": self.tok.encode(rejected) + [self.tok.eos_id],
        }


def read_pairs(cfg: DataConfig, tok: Tokenizer, entries: list[str], hf_cache: Path, *, all_eval: bool, bad) -> dict:
    """Tokenised pairs of the sources ``entries``: {"train"/"eval": list of (prompt, chosen, rejected)}."""
    out = {"train": [], "eval": []}
    for entry in resolve(entries):
        src = load_source(entry, streaming=False, txt_sample_by=cfg.txt_sample_by, cache_dir=str(hf_cache))
        proc = PreferenceRowProcessor(cfg, tok, src, all_eval=all_eval)
        for i, raw in enumerate(src.dataset):
            ex = proc.process(raw, i)
            if ex["bad"]:
                bad(ex["bad"])
            elif ex["chosen"]:
                out["eval" if ex["is_eval"] else "train"].append((ex["prompt"], ex["chosen"], ex["rejected"]))
    return out


def fit_pair(prompt, chosen, rejected, seq_len: int, long_docs: str, stats: PairStats):
    """The pair's two documents, its prompt cut from the left to fit `seq_len`, or None (dropped)."""
    stats.pairs += 1
    n = 2 * len(prompt) + len(chosen) + len(rejected)
    if n > seq_len:
        keep = (seq_len - len(chosen) - len(rejected)) // 2
        if long_docs == "drop" or keep < 1:
            stats.dropped_pairs += 1
            return None
        stats.truncated_pairs += 1
        prompt = prompt[len(prompt) - keep :]
    return list(prompt) + list(chosen), list(prompt) + list(rejected), len(prompt)


def pack_pairs(pairs, seq_len: int, pad_id: int, long_docs: str = "split") -> tuple[dict, PairStats]:
    """Pack pairs whole into rows: input_ids, labels, position_ids, doc_ids, all int32 [rows, seq_len]."""
    stats = PairStats()
    docs = [d for d in (fit_pair(*p, seq_len, long_docs, stats) for p in pairs) if d is not None]
    bins = best_fit_decreasing(np.array([len(c) + len(r) for c, r, _ in docs], dtype=np.int64), seq_len)
    rows = len(bins)
    ids = np.full((rows, seq_len), pad_id, dtype=np.int32)
    labels = np.full((rows, seq_len), IGNORE, dtype=np.int32)
    pos = np.empty((rows, seq_len), dtype=np.int32)
    doc_ids = np.full((rows, seq_len), -1, dtype=np.int32)
    ar = np.arange(seq_len, dtype=np.int32)
    for r, members in enumerate(bins):
        col = 0
        for k, m in enumerate(members):
            c, rj, p = docs[m]
            for side, doc in enumerate((c, rj)):
                n = len(doc)
                ids[r, col : col + n] = doc
                labels[r, col + p : col + n] = doc[p:]  # the response (the prompt is >= 1 token)
                pos[r, col : col + n] = ar[:n]
                doc_ids[r, col : col + n] = 2 * k + side
                col += n
        pos[r, col:] = ar[: seq_len - col]
        stats.real_tokens += col
        stats.padding_tokens += seq_len - col
    stats.rows = rows
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "doc_ids": doc_ids}, stats


class PreferenceLoader(PackedLoader):
    """PackedLoader batches plus ``doc_ids`` (and ``ref_logps`` when the reference is stored)."""

    def _make_batch(self, rows: np.ndarray) -> dict:
        batch = super()._make_batch(rows)
        real = rows >= 0
        extra = {"doc_ids": -1}
        if "ref_logps" in self.arrays:
            extra["ref_logps"] = 0.0
        for name, fill in extra.items():
            arr = self.arrays[name]
            out = np.full((len(rows),) + arr.shape[1:], fill, dtype=arr.dtype)
            if real.any():
                out[real] = arr[rows[real]]
            batch[name] = torch.from_numpy(out.astype(np.int64 if name == "doc_ids" else np.float64))
        return batch


def pairs_cache_key(cfg: DataConfig, tok: Tokenizer, train_entries, eval_entries) -> str:
    """The prepared pairs' identity: tokenizer, data settings, each source file's path/size/mtime."""

    def ident(entries):
        out = []
        for e in resolve(entries):
            p = Path(e)
            st = p.stat() if p.exists() else None
            out.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}" if st else e)
        return out

    blob = {
        "version": CACHE_VERSION,
        "kind": "preference",
        "tokenizer": tok.fingerprint,
        "config": cfg.cache_fields(),
        "train": ident(train_entries),
        "eval": ident(eval_entries),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:32]


def prepare_pairs(cfg: DataConfig, tok: Tokenizer, hf_cache: Path) -> tuple[dict, dict]:
    """Packed arrays per split ({"train": {...}, "eval": {...}}) and their stats; bad rows refused or skipped."""
    bad = BadRows(cfg)
    pairs = read_pairs(cfg, tok, cfg.train_files, hf_cache, all_eval=False, bad=bad)
    if cfg.eval_files:
        pairs["eval"] = read_pairs(cfg, tok, cfg.eval_files, hf_cache, all_eval=True, bad=bad)["eval"]
    if not pairs["train"]:
        raise DataError(
            f"no usable preference pairs in {', '.join(map(str, cfg.train_files))}"
            + (f" ({bad.count} bad rows skipped)" if bad.count else "")
        )
    arrays, stats = {}, {"skipped_rows": bad.count}
    for split, items in pairs.items():
        if items:
            arrays[split], s = pack_pairs(items, cfg.seq_len, tok.pad_id, cfg.long_docs)
            stats[split] = s.as_dict()
            log.info(
                "data %s: %d pairs -> %d rows of %d tokens, packing efficiency %.2f%%, "
                "%d truncated / %d dropped long pairs",
                split,
                s.pairs,
                s.rows,
                cfg.seq_len,
                100 * stats[split]["efficiency"],
                s.truncated_pairs,
                s.dropped_pairs,
            )
            if not s.rows:
                arrays.pop(split)
    if "train" not in arrays:
        raise DataError(f"every preference pair of {', '.join(map(str, cfg.train_files))} was dropped as too long")
    return arrays, stats


def write_pairs(cfg: DataConfig, tok: Tokenizer, hf_cache: Path, out: Path) -> dict:
    """Prepare the pairs, save their arrays in the new folder ``out`` and return their meta."""
    arrays, stats = prepare_pairs(cfg, tok, hf_cache)
    out.mkdir(parents=True)
    for split, arr in arrays.items():
        for name, a in arr.items():
            np.save(out / f"{split}_{name}.npy", a)
    return {"version": CACHE_VERSION, "splits": sorted(arrays), "stats": stats}


def preference_loaders(cfg: DataConfig, tok: Tokenizer, folder: Path, splits: list[str], **loader_args) -> dict:
    """Loaders over the packed pairs prepared in ``folder`` (the stored DPO reference sits beside)."""
    loaders = {}
    for split in splits:
        arr = {n: np.load(folder / f"{split}_{n}.npy", mmap_mode="r") for n in ARRAYS}
        files = cfg.eval_files if split == "eval" and cfg.eval_files else cfg.train_files
        what = f"{split} preference data ({', '.join(map(str, files))})"
        loaders[split] = PreferenceLoader(arr, **loader_args, train=split == "train", pad_id=tok.pad_id, what=what)
    return loaders
