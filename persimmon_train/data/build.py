"""build_data: sources -> tokenized rows -> packed / padded arrays (cached) -> loaders.

Each format prepares its arrays in its own module (prepare_packed, prepare_classification,
prepare_token_classification; preference pairs in preference); this one loads the sources, keys
and writes the cache, and builds the loaders. Preparation happens once, eagerly, before training
starts, so every bad row is found up front. The result is cached under ``cache_dir/<key>/`` as .npy
files (memory-mapped when read back); the key hashes the tokenizer file's bytes and special ids,
each source's identity (path, size, mtime, or a dataset fingerprint) and every DataConfig field that
changes the output, so a changed tokenizer, file or setting never reuses a stale cache. Loader
settings (seed, batch size, ranks) are applied at read time and are not part of the key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from persimmon_train.data.config import PACKED_FORMATS, DataConfig
from persimmon_train.data.formats import BadRows, RowProcessor
from persimmon_train.data.loader import DataBundle, PackedLoader, PaddedLoader
from persimmon_train.data.preference import pairs_cache_key, preference_loaders, write_pairs
from persimmon_train.data.prepare_classification import ClassificationPreparation
from persimmon_train.data.prepare_packed import PackedPreparation
from persimmon_train.data.prepare_token_classification import TokenClassificationPreparation
from persimmon_train.data.ragged import TokenizedSplit, list_column, take
from persimmon_train.data.sources import Source, load_source, resolve
from persimmon_train.data.streaming import StreamingPackedLoader
from persimmon_train.data.tokenizer import Tokenizer
from persimmon_train.errors import ConfigError, DataError

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    root = os.environ.get("PERSIMMON_TRAIN_CACHE")
    return Path(root) / "data" if root else Path.home() / ".cache" / "persimmon_train" / "data"


# ---------------------------------------------------------------------------------------------
# preparation (uncached path)

# Each format's preparation: the columns it keeps of a tokenized source, how a split becomes
# arrays on disk (and its stats), and its labels.
PREPARATIONS = {
    "text": PackedPreparation,
    "chat": PackedPreparation,
    "classification": ClassificationPreparation,
    "token_classification": TokenClassificationPreparation,
}


def _tokenize_source(
    i: int, source: Source, cfg: DataConfig, tok: Tokenizer, *, all_eval: bool, fixed_labels, workdir: Path, bad
) -> dict:
    """The source's valid rows, tokenized, as {"train": columns, "eval": columns}; bad rows reported to `bad`."""
    ds = source.dataset
    proc = RowProcessor(cfg, tok, source, all_eval=all_eval, fixed_labels=fixed_labels)
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
    ids, offsets = list_column(out, "input_ids")
    keep = (np.diff(offsets) > 0) & np.array([not m for m in bad_msgs], dtype=bool)
    is_eval = np.asarray(out["is_eval"], dtype=bool)
    rows = np.asarray(out["row"], dtype=np.int64)
    splits = {}
    for split, sel in (("train", keep & ~is_eval), ("eval", keep & is_eval)):
        idx = np.nonzero(sel)[0]
        columns = PREPARATIONS[cfg.format].columns(out, idx)
        splits[split] = {"input_ids": take(ids, offsets, idx), "row": rows[idx].tolist(), **columns}
    return splits


def _prepare(cfg: DataConfig, tok: Tokenizer, train_sources, eval_sources, out: Path) -> dict:
    preparation = PREPARATIONS[cfg.format]
    bad = BadRows(cfg)
    fixed = list(cfg.labels) if cfg.labels else None
    workdir = out / "_tokenized"
    workdir.mkdir(parents=True)
    splits = {"train": TokenizedSplit(), "eval": TokenizedSplit()}
    for i, src in enumerate(train_sources + eval_sources):
        fixed = fixed or preparation.fixed_labels(cfg, src)
        parts = _tokenize_source(
            i, src, cfg, tok, all_eval=i >= len(train_sources), fixed_labels=fixed, workdir=workdir, bad=bad
        )
        for split, part in parts.items():
            splits[split].parts.append(part)
            splits[split].source += [src.name] * len(part["row"])
            splits[split].row += part["row"]

    meta = {"version": CACHE_VERSION, "format": cfg.format, "splits": {}, "stats": {}}
    if not splits["train"].row:
        raise DataError(
            f"no usable training rows in {', '.join(s.name for s in train_sources)}"
            + (f" ({bad.count} bad rows skipped)" if bad.count else "")
        )
    prep = preparation(cfg, fixed)
    for split, data in splits.items():  # train first: its labels are the label set of eval
        if data.row:
            stats = prep.save(split, data, bad, out, tok.pad_id)
            meta["splits"][split] = sorted(p.name for p in out.glob(f"{split}_*.npy"))
            meta["stats"][split] = stats
    meta["stats"]["skipped_rows"] = bad.count
    if prep.labels() is not None:
        meta["labels"] = prep.labels()
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


def _prepared(cache_root: Path, key: str, prepare) -> tuple[Path, dict]:
    """The prepared data's folder ``cache_root/key`` and its meta; on a miss, ``prepare(tmp)`` writes
    the arrays into a new folder and returns their meta, and that folder is renamed into place, so a
    folder with meta.json is always complete."""
    folder = cache_root / key
    if (folder / "meta.json").is_file():
        log.info("data: using cached preparation %s", folder)
    else:
        tmp = cache_root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        try:
            meta = prepare(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, folder)  # atomic; another rank may have won the race
            except OSError:
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, json.loads((folder / "meta.json").read_text())


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
    loader_args = dict(micro_batch_size=micro_batch_size, seed=seed, rank=rank, world_size=world_size)
    if cfg.format == "preference":  # the pairs' files are read where they are prepared
        key = pairs_cache_key(cfg, tok, cfg.train_files, cfg.eval_files)
        folder, meta = _prepared(cache_root, key, functools.partial(write_pairs, cfg, tok, cache_root / "hf"))
        loaders = preference_loaders(cfg, tok, folder, meta["splits"], **loader_args)
        stats = dict(meta["stats"], cache=str(folder), key=key)
        if stats.get("skipped_rows"):
            log.warning("data: skipped %d bad rows", stats["skipped_rows"])
        labels = {"problem_type": "regression", "names": None}  # reward models: one score per document
    else:
        train_sources = _load_sources(cfg.train_files, cfg, cache_root / "hf")
        eval_sources = _load_sources(cfg.eval_files, cfg, cache_root / "hf")
        if cfg.streaming:
            return _build_streaming(cfg, tok, train_sources, eval_sources, **loader_args)
        key = _cache_key(cfg, tok, train_sources, eval_sources)
        folder, meta = _prepared(cache_root, key, functools.partial(_prepare, cfg, tok, train_sources, eval_sources))
        loaders = {}
        for split, files in meta["splits"].items():
            arrays = {f[len(split) + 1 : -4]: np.load(folder / f, mmap_mode="r") for f in files}
            sources = train_sources if split == "train" or not eval_sources else eval_sources
            what = f"{split} data ({', '.join(s.name for s in sources)})"
            loader = PackedLoader if cfg.format in PACKED_FORMATS else PaddedLoader
            loaders[split] = loader(arrays, **loader_args, train=split == "train", pad_id=tok.pad_id, what=what)
        stats = dict(meta["stats"], cache=str(folder))
        _log_stats(cfg, stats)
        if cfg.eval_fraction and not cfg.eval_files and "eval" not in loaders:
            log.warning("data: eval_fraction=%s selected no rows; no eval data", cfg.eval_fraction)
        labels = meta.get("labels")
    bundle = DataBundle(loaders["train"], loaders.get("eval"), stats=stats)
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
        bad = BadRows(cfg)
        for src in sources:
            proc = RowProcessor(cfg, tok, src, all_eval=all_eval)
            ds = src.dataset
            mapped = ds.map(proc, batched=True, batch_size=256, with_indices=True, remove_columns=ds.column_names)
            for ex in mapped:
                if ex["bad"]:
                    bad(ex["bad"])
                    continue
                if ex["input_ids"] and bool(ex["is_eval"]) == want_eval:
                    yield ex["input_ids"], ex["labels"]

    return documents


def _build_streaming(cfg, tok, train_sources, eval_sources, **loader_args) -> DataBundle:
    common = dict(
        seq_len=cfg.seq_len,
        pad_id=tok.pad_id,
        long_docs=cfg.long_docs,
        buffer_rows=cfg.stream_buffer_rows,
        **loader_args,
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
