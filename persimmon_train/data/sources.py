"""Resolve data sources and read them through `datasets`, one source at a time.

A source is one file, one ``save_to_disk`` folder, or one cached hub dataset. Reading each on its
own keeps the row number of every example, so a bad row can be reported as ``file row N``.

JSONL is read with the ``text`` builder (one row per line) and parsed per row in the tokenizing
map: a malformed line or a field whose type changes between rows then becomes an error for that
row (or a skipped row), not a schema error for the whole file.

A local file's identity (path, size, mtime) needs no reading: its dataset is opened on first use
(`Source.dataset`), so a run whose preparation is cached -- every rank after the first run, every
resume -- neither opens the file nor imports `datasets` (0.65 s of imports per process).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persimmon_train.errors import DataError

# extension -> datasets builder
BUILDERS = {".jsonl": "text", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".tsv": "csv"}
HUB_PREFIX = "hf:"


@dataclass
class Source:
    name: str  # shown in error messages (a path, or hf:NAME)
    kind: str  # "jsonl" (rows are JSON strings to parse) | "table" (rows are dicts) | "txt"
    fingerprint: str  # identity for the cache key (path, size, mtime; or dataset fingerprint)
    open: Callable[[], Any] = field(repr=False)  # -> the datasets.Dataset / IterableDataset

    @functools.cached_property
    def dataset(self):
        """The datasets (Iterable)Dataset, opened on first use; an unreadable file raises DataError here."""
        return self.open()


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def resolve(entries: list[str]) -> list[str]:
    """Expand paths, globs and folders into a sorted, de-duplicated list of sources."""
    out: list[str] = []
    for entry in entries:
        entry = str(entry)
        if entry.startswith(HUB_PREFIX):
            out.append(entry)
            continue
        p = Path(os.path.expanduser(entry))
        if p.is_dir():
            if _is_saved_dataset(p):
                out.append(str(p))
            else:
                files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in BUILDERS)
                if not files:
                    raise DataError(f"data folder {p} holds no {'/'.join(sorted(BUILDERS))} files")
                out += files
        elif p.is_file():
            out.append(str(p))
        elif glob.has_magic(entry):
            files = sorted(f for f in glob.glob(os.path.expanduser(entry), recursive=True) if os.path.isfile(f))
            if not files:
                raise DataError(f"data glob {entry!r} matches no files")
            out += files
        else:
            raise DataError(f"data file not found: {entry}")
    seen = set()
    return [s for s in out if not (s in seen or seen.add(s))]


@contextlib.contextmanager
def _offline():
    """Read hub datasets from the local cache only: nothing may be downloaded."""
    import datasets

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def _parse_hub(entry: str) -> tuple[str, str | None, str]:
    spec = entry[len(HUB_PREFIX) :]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    return name, config or None, split or "train"


def _pick_split(ds, name: str):
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if "train" in ds:
            return ds["train"]
        if len(ds) == 1:
            return next(iter(ds.values()))
        raise DataError(
            f"{name}: a dataset with splits {sorted(ds)} has no 'train' split; "
            f"name the split as hf:NAME@SPLIT or save one split"
        )
    return ds


def load_source(entry: str, *, streaming: bool, txt_sample_by: str, cache_dir: str | None) -> Source:
    """One resolved source. A hub dataset or a save_to_disk folder is opened here (its fingerprint is
    the dataset's); a file is opened when its dataset is first read, or here when streaming (to
    surface a file that is not what its extension says before training). Errors name the file."""
    if entry.startswith(HUB_PREFIX):
        import datasets

        name, config, split = _parse_hub(entry)
        try:
            with _offline():
                ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
        except Exception as e:
            raise DataError(
                f"{entry}: cannot load hub dataset {name!r} (config {config}, split "
                f"{split!r}) from the local cache, offline: {type(e).__name__}: {e}"
            ) from None
        fp = getattr(ds, "_fingerprint", None) or f"{entry}:{getattr(ds, 'info', None) and ds.info.version}"
        return Source(entry, "table", f"{entry}:{fp}", lambda: ds)

    path = Path(entry)
    if path.is_dir():  # save_to_disk folder
        import datasets

        try:
            ds = _pick_split(datasets.load_from_disk(str(path)), entry)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{path}: cannot load a save_to_disk dataset ({type(e).__name__}: {e})") from None
        if streaming:
            ds = ds.to_iterable_dataset()
        fp = f"{path.resolve()}:{ds._fingerprint if hasattr(ds, '_fingerprint') else ''}"
        return Source(entry, "table", fp, lambda: ds)

    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use one of {', '.join(sorted(BUILDERS))})")
    kwargs = {}
    if builder == "text":
        kwargs["sample_by"] = "line" if path.suffix == ".jsonl" else txt_sample_by
        kwargs["encoding"] = "utf-8"
    if path.suffix.lower() == ".tsv":
        kwargs["sep"] = "\t"
    kind = "jsonl" if path.suffix.lower() == ".jsonl" else ("txt" if builder == "text" else "table")

    def open_file():
        import datasets

        try:
            ds = datasets.load_dataset(
                builder, data_files=[str(path)], split="train", streaming=streaming, cache_dir=cache_dir, **kwargs
            )
            if streaming:  # surface "not what its extension says" now, not mid-training
                next(iter(ds.take(1)), None)
        except Exception as e:
            what = f"{type(e).__name__}: {_short(e)}"
            raise DataError(f"{path}: cannot read as {path.suffix.lstrip('.')} ({what})") from None
        return ds

    source = Source(entry, kind, _file_fingerprint(path), open_file)
    if streaming:
        source.dataset  # noqa: B018 -- opened now: a streaming run reads it at once anyway
    return source


def _short(e: Exception) -> str:
    msg = str(e)
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and str(cause) not in msg:
        msg = f"{msg}; {type(cause).__name__}: {cause}"
    msg = " ".join(msg.split())
    return msg[:400]


def parse_jsonl_row(line: str) -> dict:
    """Parse one JSONL line; raises ValueError for malformed JSON or a non-object row."""
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    return row
