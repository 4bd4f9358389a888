"""What the data cache key covers, where the eval split comes from, and the order of collected labels."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from persimmon_train.data import DataConfig, build_data
from persimmon_train.data.build import _cache_key

ROWS = [{"text": f"document number {i} " + "word " * (i % 9)} for i in range(80)]
# DataConfig fields that do not change the prepared arrays (how many workers, where, read how).
NOT_IN_KEY = {"num_proc", "cache_dir", "streaming", "stream_buffer_rows"}


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, list):
        return [*value, "other"]
    assert value is None
    return ["other"]


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(DataConfig)])
def test_every_setting_that_changes_the_arrays_changes_the_key(tok, name):
    base = DataConfig(train_files=["t.jsonl"])
    changed = dataclasses.replace(base, **{name: _changed(getattr(base, name))})
    same = _cache_key(base, tok, [], []) == _cache_key(changed, tok, [], [])
    assert same == (name in NOT_IN_KEY), name


def _docs(loader, tok) -> set[str]:
    arr = loader.arrays
    out = set()
    for ids, pos in zip(arr["input_ids"], arr["position_ids"]):
        starts = np.nonzero(pos == 0)[0].tolist() + [len(pos)]
        for a, b in zip(starts[:-1], starts[1:]):
            if ids[a] != tok.pad_id:
                out.add(tok.decode(ids[a : b - 1].tolist()))
    return out


def _split(folder, tok, cache, **kw):
    cfg = DataConfig(train_files=[str(folder)], eval_fraction=0.25, seq_len=64, cache_dir=cache, **kw)
    bundle = build_data(cfg, tok, micro_batch_size=1, seed=0)
    return _docs(bundle.train_loader, tok), _docs(bundle.eval_loader, tok), bundle.stats["cache"]


def test_split_seed_changes_the_cache_and_the_split(tok, write_jsonl, cache, tmp_path):
    write_jsonl("t.jsonl", ROWS)
    train0, eval0, cache0 = _split(tmp_path / "t.jsonl", tok, cache, split_seed=0)
    train1, eval1, cache1 = _split(tmp_path / "t.jsonl", tok, cache, split_seed=1)
    assert cache0 != cache1
    assert eval0 != eval1 and train0 | eval0 == train1 | eval1 == {r["text"] for r in ROWS}


def test_moving_the_data_folder_keeps_the_split(tok, tmp_path, cache):
    """The eval split hashes (file name, row, split_seed): a folder moved or renamed keeps its rows' sides."""
    first = tmp_path / "project" / "data"
    first.mkdir(parents=True)
    for part in range(2):
        with open(first / f"part{part}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(f'{{"text": "{r["text"]} of part {part}"}}\n' for r in ROWS[:40])
    train, evals, key = _split(first, tok, cache)
    assert train and evals
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))
    train2, evals2, key2 = _split(moved, tok, cache)
    assert key2 != key  # another path: prepared again, not read from the old cache
    assert (train2, evals2) == (train, evals)


def test_collected_label_ids_are_sorted(tok, write_jsonl, cache, tmp_path):
    """Label ids come from the sorted label names, not the order the data (or a set) yields them."""
    names = ["zebra", "mango", "kiwi", "apple", "lemon", "banana", "cherry", "fig", "grape", "date", "plum"]
    rows = [{"text": f"row {i}", "label": names[i % len(names)]} for i in range(44)]
    cfg = DataConfig(train_files=[write_jsonl("c.jsonl", rows)], format="classification", seq_len=16, cache_dir=cache)
    bundle = build_data(cfg, tok, micro_batch_size=4, seed=0)
    assert list(bundle.id2label.values()) == sorted(names)
    tags = [{"tokens": ["a", "b", "c"], "tags": [names[i % 11], names[(i + 3) % 11], "O"]} for i in range(11)]
    cfg = DataConfig(
        train_files=[write_jsonl("t.jsonl", tags)], format="token_classification", seq_len=16, cache_dir=cache
    )
    bundle = build_data(cfg, tok, micro_batch_size=1, seed=0)
    assert list(bundle.id2label.values()) == sorted([*names, "O"])


def test_a_cached_preparation_does_not_open_the_file(tok, write_jsonl, cache, monkeypatch):
    """Every rank of every later run (and every resume) reads the prepared arrays only: the file's
    identity is its path, size and mtime, so `datasets` does not open it again."""
    import datasets

    cfg = DataConfig(train_files=[write_jsonl("t.jsonl", ROWS)], seq_len=64, cache_dir=cache)
    first = build_data(cfg, tok, micro_batch_size=1, seed=0)

    def refuse(*args, **kwargs):
        raise AssertionError("the file was opened again")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    again = build_data(cfg, tok, micro_batch_size=1, seed=0)
    assert again.stats["cache"] == first.stats["cache"]
    assert _docs(again.train_loader, tok) == _docs(first.train_loader, tok)
