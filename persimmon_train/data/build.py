"""build_data: sources -> tokenized rows -> packed / padded arrays (cached) -> loaders.

Preparation happens once, eagerly, before training starts, so every bad row is found up front.
The result is cached under ``cache_dir/<key>/`` as .npy files (memory-mapped when read back);
the key hashes the tokenizer file's bytes and special ids, each source's identity (path, size,
mtime, or a dataset fingerprint) and every DataConfig field that changes the output, so a changed
tokenizer, file or setting never reuses a stale cache. Loader settings (seed, batch size, ranks)
are applied at read time and are not part of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from persimmon_train.data.config import PACKED_FORMATS, DataConfig
from persimmon_train.data.formats import RowProcessor
from persimmon_train.data.loader import PackedLoader, PaddedLoader
from persimmon_train.data.packing import pack
from persimmon_train.data.sources import Source, load_source, resolve
from persimmon_train.data.streaming import StreamingPackedLoader
from persimmon_train.data.tokenizer import Tokenizer
from persimmon_train.errors import ConfigError, DataError
from persimmon_train.model.loss import IGNORE_INDEX as IGNORE

log = logging.getLogger(__name__)
CACHE_VERSION = 1
MAX_BAD_ROWS_LOGGED = 5


@dataclass
class DataBundle:
    train_loader: object
    eval_loader: object | None
    num_labels: int | None = None
    id2label: dict | None = None
    label2id: dict | None = None
    problem_type: str | None = None
    stats: dict = field(default_factory=dict)


def default_cache_dir() -> Path:
    root = os.environ.get("PERSIMMON_TRAIN_CACHE")
    return Path(root) / "data" if root else Path.home() / ".cache" / "persimmon_train" / "data"


# ---------------------------------------------------------------------------------------------
# helpers over tokenized datasets


def _list_column(ds, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, offsets) numpy arrays without Python loops."""
    col = ds.data.column(name).combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.flatten()
    offsets = offsets - offsets[0]
    if name in ("label_names", "tag_names"):
        return np.asarray(values.to_pylist(), dtype=object), offsets
    return values.to_numpy(zero_copy_only=False), offsets


def _take(values: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Select ragged rows ``idx`` from (values, offsets)."""
    idx = np.asarray(idx, dtype=np.int64)
    starts = offsets[idx]
    lens = offsets[idx + 1] - starts
    new_off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    gather = np.repeat(starts - new_off[:-1], lens) + np.arange(new_off[-1], dtype=np.int64)
    return values[gather], new_off


@dataclass
class _Tokenized:
    """All rows of one split (from every source), valid ones only."""

    source: list = field(default_factory=list)  # per row: source name
    row: list = field(default_factory=list)  # per row: 1-based row number
    parts: list = field(default_factory=list)  # per source: dict of columns for its kept rows

    def concat(self, name: str):
        vals = [p[name] for p in self.parts]
        if name in ("input_ids", "labels", "tag_names"):
            flat = [v for v, _ in vals]
            offs, base = [np.zeros(1, np.int64)], 0
            for _, o in vals:
                offs.append(o[1:] + base)
                base += o[-1]
            return (np.concatenate(flat) if flat else np.zeros(0, np.int32), np.concatenate(offs))
        return [x for v in vals for x in v]


class _BadRows:
    def __init__(self, cfg: DataConfig):
        self.cfg, self.count, self.logged = cfg, 0, 0

    def __call__(self, message: str) -> None:
        if self.cfg.on_bad_row == "error":
            raise DataError(message + " (set data.on_bad_row=skip to skip bad rows)")
        self.count += 1
        if self.logged < MAX_BAD_ROWS_LOGGED:
            log.warning("skipping bad row: %s", message)
            self.logged += 1


def _fixed_labels_from_features(cfg: DataConfig, source: Source) -> list[str] | None:
    """A ClassLabel column (parquet / save_to_disk / hub) carries its label names."""
    feats = getattr(source.dataset, "features", None) or {}
    name = cfg.label_field if cfg.format == "classification" else cfg.tags_field
    f = feats.get(name)
    f = getattr(f, "feature", f)  # Sequence/List(ClassLabel) for tags or multi-label
    names = getattr(f, "names", None)
    return list(names) if names else None


def _tokenize_source(
    i: int,
    source: Source,
    cfg: DataConfig,
    tok: Tokenizer,
    *,
    is_eval_source: bool,
    fixed_labels,
    workdir: Path,
    bad: _BadRows,
):
    ds = source.dataset
    proc = RowProcessor(
        cfg,
        tok,
        source.name,
        source.kind,
        all_eval=is_eval_source,
        eval_fraction=0.0 if (is_eval_source or cfg.eval_files) else cfg.eval_fraction,
        fixed_labels=fixed_labels,
    )
    num_proc = max(1, min(int(cfg.num_proc), len(ds) // 64 or 1))
    out = ds.map(
        proc,
        batched=True,
        batch_size=256,
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        load_from_cache_file=False,
        cache_file_name=str(workdir / f"source{i}.arrow"),
        desc=f"tokenizing {source.name}",
    )
    bad_msgs = out["bad"]
    for m in bad_msgs:
        if m:
            bad(m)
    ids, offsets = _list_column(out, "input_ids")
    lengths = np.diff(offsets)
    keep = (lengths > 0) & np.array([not m for m in bad_msgs], dtype=bool)
    is_eval = np.asarray(out["is_eval"], dtype=bool)
    rows = np.asarray(out["row"], dtype=np.int64)
    splits = {}
    for split, sel in (("train", keep & ~is_eval), ("eval", keep & is_eval)):
        idx = np.nonzero(sel)[0]
        part = {"input_ids": _take(ids, offsets, idx), "row": rows[idx].tolist()}
        if cfg.format in PACKED_FORMATS:
            labels, loff = _list_column(out, "labels")
            part["labels"] = _take(labels, loff, idx)
        elif cfg.format == "classification":
            names, noff = _list_column(out, "label_names")
            part["label_names"] = [list(names[noff[j] : noff[j + 1]]) for j in idx]
            part["label_kind"] = [k for k, s in zip(out["label_kind"], sel) if s]
            part["label_float"] = np.asarray(out["label_float"], dtype=np.float64)[idx].tolist()
            part["truncated"] = int(np.asarray(out["truncated"], dtype=bool)[idx].sum())
        else:
            names, noff = _list_column(out, "tag_names")
            part["tag_names"] = _take(names, noff, idx)
            part["truncated"] = int(np.asarray(out["truncated"], dtype=bool)[idx].sum())
        splits[split] = part
    return splits


# ---------------------------------------------------------------------------------------------
# labels


class _LabelSpace:
    """Label set and problem type, fixed by config / ClassLabel features or collected from train."""

    def __init__(self, cfg: DataConfig, fixed: list[str] | None):
        self.cfg = cfg
        self.fixed = fixed
        self.problem_type = cfg.problem_type
        self.names: list[str] | None = list(fixed) if fixed else None

    @staticmethod
    def _problem_of(kind: str) -> str:
        return {
            "name": "single_label_classification",
            "id": "single_label_classification",
            "multi": "multi_label_classification",
            "float": "regression",
        }[kind]

    def collect(self, kinds, names_lists, where, bad: _BadRows, learn: bool) -> list[bool]:
        """Settle the problem type and (unless fixed) the label names; return rows that fit."""
        c = self.cfg
        ok = []
        if self.problem_type is None and kinds:
            self.problem_type = self._problem_of(kinds[0])
        seen_names, max_id, uses = set(), -1, set()
        for kind, names, w in zip(kinds, names_lists, where):
            expected = self.problem_type
            fits = self._problem_of(kind) == expected or (
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
        try:
            return self.label2id[name]
        except KeyError:
            return None

    @property
    def label2id(self) -> dict:
        if not hasattr(self, "_l2i"):
            self._l2i = {n: i for i, n in enumerate(self.names or [])}
        return self._l2i


def _collect_tags(space: _LabelSpace, train_tags: np.ndarray):
    if space.names is None:
        names = {t for t in train_tags.tolist() if t}
        ids = {n for n in names if n.startswith("#")}
        if ids and ids != names:
            raise DataError(
                f"field '{space.cfg.tags_field}' mixes tag names and integer ids; use one or set data.labels"
            )
        space.names = [str(i) for i in range(max(int(n[1:]) for n in ids) + 1)] if ids else sorted(names)


# ---------------------------------------------------------------------------------------------
# preparation (uncached path)


def _prepare(cfg: DataConfig, tok: Tokenizer, train_sources, eval_sources, out: Path) -> dict:
    bad = _BadRows(cfg)
    fixed = list(cfg.labels) if cfg.labels else None
    workdir = out / "_tokenized"
    workdir.mkdir(parents=True)
    splits = {"train": _Tokenized(), "eval": _Tokenized()}
    for i, src in enumerate(train_sources + eval_sources):
        is_eval_source = i >= len(train_sources)
        src_fixed = fixed or (
            _fixed_labels_from_features(cfg, src) if cfg.format in ("classification", "token_classification") else None
        )
        if src_fixed and not fixed and cfg.format != "text":
            fixed = src_fixed
        parts = _tokenize_source(
            i, src, cfg, tok, is_eval_source=is_eval_source, fixed_labels=fixed, workdir=workdir, bad=bad
        )
        for split, part in parts.items():
            splits[split].parts.append(part)
            splits[split].source += [src.name] * len(part["row"])
            splits[split].row += part["row"]

    meta = {"version": CACHE_VERSION, "format": cfg.format, "splits": {}, "stats": {}}
    train = splits["train"]
    if not train.row:
        raise DataError(
            f"no usable training rows in {', '.join(s.name for s in train_sources)}"
            + (f" ({bad.count} bad rows skipped)" if bad.count else "")
        )

    space = _LabelSpace(cfg, fixed) if cfg.format in ("classification", "token_classification") else None
    if cfg.format == "token_classification":
        _collect_tags(space, train.concat("tag_names")[0])

    for split, data in splits.items():
        if not data.row:
            continue
        where = [f"{s} row {r}" for s, r in zip(data.source, data.row)]
        ids, offsets = data.concat("input_ids")
        stats: dict = {}
        if cfg.format in PACKED_FORMATS:
            labels, _ = data.concat("labels")
            rows, pstats = pack(ids, labels, offsets, cfg.seq_len, tok.pad_id, cfg.long_docs)
            for name, arr in rows.items():
                np.save(out / f"{split}_{name}.npy", arr)
            stats = pstats.as_dict()
        elif cfg.format == "classification":
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
                    n = names[lids.index(None)]
                    shown = f"id {n[1:]}" if n.startswith("#") else repr(n)
                    bad(
                        f"{where[j]}, field '{cfg.label_field}': label {shown} is not in the label "
                        f"set {space.names} (collected from the training data; set data.labels to fix it)"
                    )
                    continue
                if space.problem_type == "multi_label_classification":
                    hot = np.zeros(len(space.names), np.float32)
                    hot[lids] = 1.0
                    labels.append(hot)
                else:
                    labels.append(lids[0])
                keep.append(j)
            ids, offsets = _take(ids, offsets, np.asarray(keep, dtype=np.int64))
            dtype = np.int64 if space.problem_type == "single_label_classification" else np.float32
            lab = np.asarray(labels, dtype=dtype)
            if space.problem_type == "multi_label_classification":
                lab = lab.reshape(len(keep), len(space.names))
            np.save(out / f"{split}_labels.npy", lab)
            np.save(out / f"{split}_input_ids.npy", ids.astype(np.int32))
            np.save(out / f"{split}_offsets.npy", offsets)
            stats = {
                "examples": len(keep),
                "tokens": int(offsets[-1]),
                "truncated": sum(p["truncated"] for p in data.parts),
            }
        else:
            tags, _ = data.concat("tag_names")
            tag_ids = np.full(len(tags), IGNORE, dtype=np.int64)
            doc_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
            keep_doc = np.ones(len(offsets) - 1, dtype=bool)
            for k, t in enumerate(tags.tolist()):
                if t:
                    i = space.id_of(t)
                    if i is None:
                        j = int(doc_of[k])
                        if keep_doc[j]:
                            shown = f"id {t[1:]}" if t.startswith("#") else repr(t)
                            bad(
                                f"{where[j]}, field '{cfg.tags_field}': tag {shown} is not in the tag "
                                f"set {space.names} (collected from the training data; set data.labels)"
                            )
                            keep_doc[j] = False
                    else:
                        tag_ids[k] = i
            idx = np.nonzero(keep_doc)[0]
            tag_ids, _ = _take(tag_ids, offsets, idx)
            ids, offsets = _take(ids, offsets, idx)
            np.save(out / f"{split}_input_ids.npy", ids.astype(np.int32))
            np.save(out / f"{split}_offsets.npy", offsets)
            np.save(out / f"{split}_token_labels.npy", tag_ids)
            stats = {
                "examples": int(len(idx)),
                "tokens": int(offsets[-1]),
                "truncated": sum(p["truncated"] for p in data.parts),
            }
        meta["splits"][split] = sorted(p.name for p in out.glob(f"{split}_*.npy"))
        meta["stats"][split] = stats
    meta["stats"]["skipped_rows"] = bad.count
    if space is not None:
        meta["labels"] = {
            "problem_type": space.problem_type if cfg.format == "classification" else None,
            "names": space.names if space.problem_type != "regression" else None,
        }
    shutil.rmtree(workdir, ignore_errors=True)
    return meta


# ---------------------------------------------------------------------------------------------
# entry point


def _cache_key(cfg: DataConfig, tok: Tokenizer, train_sources, eval_sources) -> str:
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "tokenizer": tok.fingerprint,
            "config": cfg.cache_fields(),
            "train": [s.fingerprint for s in train_sources],
            "eval": [s.fingerprint for s in eval_sources],
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _load_sources(entries, cfg: DataConfig, hf_cache: Path):
    return [
        load_source(e, streaming=cfg.streaming, txt_sample_by=cfg.txt_sample_by, cache_dir=str(hf_cache))
        for e in resolve(entries)
    ]


def build_data(cfg, tokenizer, *, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Prepare (or load from cache) the data of ``cfg`` and return loaders for this rank."""
    cfg = DataConfig.from_any(cfg).validate()
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    cache_root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        key = "data.cache_dir" if cfg.cache_dir else "data.cache_dir (default: $PERSIMMON_TRAIN_CACHE/data)"
        raise ConfigError(f"{key}: cannot create {str(cache_root)!r} ({e.strerror or type(e).__name__})") from None
    if cfg.format == "preference":
        from persimmon_train.data.preference import build_preference_data

        return build_preference_data(
            cfg, tok, micro_batch_size=micro_batch_size, seed=seed, rank=rank, world_size=world_size
        )
    train_sources = _load_sources(cfg.train_files, cfg, cache_root / "hf")
    eval_sources = _load_sources(cfg.eval_files, cfg, cache_root / "hf")
    if cfg.streaming:
        return _build_streaming(cfg, tok, train_sources, eval_sources, micro_batch_size, seed, rank, world_size)

    key = _cache_key(cfg, tok, train_sources, eval_sources)
    folder = cache_root / key
    if (folder / "meta.json").is_file():
        log.info("data: using cached preparation %s", folder)
    else:
        tmp = cache_root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        try:
            meta = _prepare(cfg, tok, train_sources, eval_sources, tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, folder)  # atomic; another rank may have won the race
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {
        split: {f[len(split) + 1 : -4]: np.load(folder / f, mmap_mode="r") for f in files}
        for split, files in meta["splits"].items()
    }
    loaders = {}
    for split, arr in arrays.items():
        train = split == "train"
        sources = train_sources if train or not eval_sources else eval_sources
        what = f"{split} data ({', '.join(s.name for s in sources)})"
        if cfg.format in PACKED_FORMATS:
            loaders[split] = PackedLoader(
                arr, micro_batch_size, seed, rank, world_size, train=train, pad_id=tok.pad_id, what=what
            )
        else:
            loaders[split] = PaddedLoader(
                arr, micro_batch_size, seed, rank, world_size, train=train, pad_id=tok.pad_id, what=what
            )
    stats = dict(meta["stats"], cache=str(folder))
    _log_stats(cfg, stats)
    if cfg.eval_fraction and not cfg.eval_files and "eval" not in loaders:
        log.warning("data: eval_fraction=%s selected no rows; no eval data", cfg.eval_fraction)
    bundle = DataBundle(loaders["train"], loaders.get("eval"), stats=stats)
    labels = meta.get("labels")
    if labels:
        names = labels["names"]
        bundle.problem_type = labels["problem_type"]
        if names is None:  # regression
            names = ["LABEL_0"]
        bundle.num_labels = len(names)
        bundle.id2label = {i: n for i, n in enumerate(names)}
        bundle.label2id = {n: i for i, n in enumerate(names)}
    return bundle


def _log_stats(cfg: DataConfig, stats: dict) -> None:
    for split in ("train", "eval"):
        s = stats.get(split)
        if not s:
            continue
        if cfg.format in PACKED_FORMATS:
            log.info(
                "data %s: %d documents -> %d rows of %d tokens, %d real tokens, packing efficiency "
                "%.2f%%, %d split / %d dropped long documents",
                split,
                s["documents"],
                s["rows"],
                cfg.seq_len,
                s["real_tokens"],
                100 * s["efficiency"],
                s["split_documents"],
                s["dropped_documents"],
            )
        else:
            log.info(
                "data %s: %d examples, %d tokens, %d truncated to %d tokens",
                split,
                s["examples"],
                s["tokens"],
                s["truncated"],
                cfg.seq_len,
            )
    if stats.get("skipped_rows"):
        log.warning("data: skipped %d bad rows", stats["skipped_rows"])


def _stream_documents(cfg: DataConfig, tok: Tokenizer, sources, *, want_eval: bool, all_eval: bool):
    def documents():
        bad = _BadRows(cfg)
        for src in sources:
            proc = RowProcessor(
                cfg,
                tok,
                src.name,
                src.kind,
                all_eval=all_eval,
                eval_fraction=0.0 if (all_eval or cfg.eval_files) else cfg.eval_fraction,
                fixed_labels=None,
            )
            ds = src.dataset
            mapped = ds.map(proc, batched=True, batch_size=256, with_indices=True, remove_columns=ds.column_names)
            for ex in mapped:
                if ex["bad"]:
                    bad(ex["bad"])
                    continue
                if ex["input_ids"] and bool(ex["is_eval"]) == want_eval:
                    yield ex["input_ids"], ex["labels"]

    return documents


def _build_streaming(cfg, tok, train_sources, eval_sources, micro, seed, rank, world) -> DataBundle:
    common = dict(
        seq_len=cfg.seq_len,
        pad_id=tok.pad_id,
        long_docs=cfg.long_docs,
        buffer_rows=cfg.stream_buffer_rows,
        micro_batch_size=micro,
        seed=seed,
        rank=rank,
        world_size=world,
    )
    train_docs = _stream_documents(cfg, tok, train_sources, want_eval=False, all_eval=False)
    if next(iter(train_docs()), None) is None:  # validates the first rows before training starts
        raise DataError(f"no usable training rows in {', '.join(s.name for s in train_sources)}")
    train = StreamingPackedLoader(train_docs, train=True, **common)
    eval_loader = None
    if eval_sources:
        eval_loader = StreamingPackedLoader(
            _stream_documents(cfg, tok, eval_sources, want_eval=True, all_eval=True), train=False, **common
        )
    elif cfg.eval_fraction:
        eval_loader = StreamingPackedLoader(
            _stream_documents(cfg, tok, train_sources, want_eval=True, all_eval=False), train=False, **common
        )
    return DataBundle(train, eval_loader, stats={"streaming": True})
