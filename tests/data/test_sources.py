import json

import datasets
import numpy as np
import pytest

from persimmon_train.data import DataConfig, Tokenizer, build_data
from persimmon_train.data.train_tokenizer import train_tokenizer
from persimmon_train.errors import DataError

ROWS = [{"text": f"document number {i} " + "word " * (i % 9)} for i in range(60)]


def _docs(bundle, tok):
    """Decoded documents of a packed train split (order-free)."""
    arr = bundle.train_loader.arrays
    out = []
    for ids, pos, lab in zip(arr["input_ids"], arr["position_ids"], arr["labels"]):
        starts = np.nonzero(pos == 0)[0].tolist() + [len(pos)]
        for a, b in zip(starts[:-1], starts[1:]):
            if (lab[a:b] != -100).any():
                out.append(tok.decode(ids[a : b - 1].tolist()))
    return sorted(out)


def _cfg(files, cache, **kw):
    kw.setdefault("seq_len", 64)
    return DataConfig(train_files=files, cache_dir=cache, **kw)


def test_all_file_types_globs_folders_and_save_to_disk(tok, tmp_path, cache):
    want = sorted(r["text"] for r in ROWS)
    d = tmp_path / "mixed"
    d.mkdir()
    ds = datasets.Dataset.from_list(ROWS)
    ds.select(range(0, 15)).to_parquet(str(d / "a.parquet"))
    ds.select(range(15, 30)).to_csv(str(d / "b.csv"), index=False)
    ds.select(range(30, 45)).to_json(str(d / "c.json"), lines=False)
    with open(d / "d.jsonl", "w") as f:
        for r in ROWS[45:55]:
            f.write(json.dumps(r) + "\n")
    for i, r in enumerate(ROWS[55:]):
        (d / f"e{i}.txt").write_text(r["text"])
    by_folder = build_data(_cfg([str(d)], cache), tok, micro_batch_size=1, seed=0)
    assert _docs(by_folder, tok) == want
    by_glob = build_data(
        _cfg([str(d / "*.parquet"), str(d / "*.csv"), str(d / "*.json"), str(d / "*.jsonl"), str(d / "e*.txt")], cache),
        tok,
        micro_batch_size=1,
        seed=0,
    )
    assert _docs(by_glob, tok) == want
    ds.save_to_disk(str(tmp_path / "saved"))
    saved = build_data(_cfg([str(tmp_path / "saved")], cache, num_proc=2), tok, micro_batch_size=1, seed=0)
    assert _docs(saved, tok) == want


def test_classlabel_names_become_the_label_set(tok, tmp_path, cache):
    feats = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "neu", "pos"])}
    )
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [2, 0]}, features=feats).save_to_disk(str(tmp_path / "s"))
    b = build_data(_cfg([str(tmp_path / "s")], cache, format="classification"), tok, micro_batch_size=2, seed=0)
    assert b.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert sorted(next(iter(b.train_loader))["labels"].tolist()) == [0, 2]


def test_eval_fraction_is_disjoint_and_stable(tok, write_jsonl, cache):
    f = write_jsonl("t.jsonl", ROWS)
    b = build_data(_cfg([f], cache, eval_fraction=0.25), tok, micro_batch_size=1, seed=0)
    train = set(_docs(b, tok))
    ev = b.eval_loader.arrays
    eval_docs = {
        tok.decode(ids[a : bb - 1].tolist())
        for ids, pos in zip(ev["input_ids"], ev["position_ids"])
        for starts in [np.nonzero(pos == 0)[0].tolist() + [len(pos)]]
        for a, bb in zip(starts[:-1], starts[1:])
        if ids[a] != tok.pad_id
    }
    assert train and eval_docs and not train & eval_docs
    assert train | eval_docs == {r["text"] for r in ROWS}
    again = build_data(_cfg([f], cache, eval_fraction=0.25, num_proc=2), tok, micro_batch_size=1, seed=5)
    assert set(_docs(again, tok)) == train


def test_cache_key_covers_tokenizer_settings_and_files(tok, tmp_path, write_jsonl, cache):
    f = write_jsonl("t.jsonl", ROWS)
    a = build_data(_cfg([f], cache), tok, micro_batch_size=1, seed=0).stats["cache"]
    assert build_data(_cfg([f], cache), tok, micro_batch_size=2, seed=9).stats["cache"] == a
    assert build_data(_cfg([f], cache, seq_len=128), tok, micro_batch_size=1, seed=0).stats["cache"] != a
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"{r['text']}\n" for r in ROWS))
    other = Tokenizer(train_tokenizer([corpus], tmp_path / "other.model", vocab_size=300))
    b = build_data(_cfg([f], cache), other, micro_batch_size=1, seed=0)
    assert b.stats["cache"] != a and _docs(b, other) == sorted(r["text"] for r in ROWS)
    with open(f, "a") as fh:
        fh.write(json.dumps({"text": "one more document"}) + "\n")
    c = build_data(_cfg([f], cache), tok, micro_batch_size=1, seed=0)
    assert c.stats["cache"] != a and "one more document" in _docs(c, tok)


def _packed_documents(rows) -> list[tuple]:
    """(token ids, labels) of every real document in packed rows (pad "documents" left out)."""
    out = []
    for ids, lab, pos in rows:
        ids, lab, pos = (np.asarray(x) for x in (ids, lab, pos))
        starts = np.nonzero(pos == 0)[0].tolist() + [len(pos)]
        for a, b in zip(starts[:-1], starts[1:]):
            if (lab[a:b] != -100).any():
                out.append((tuple(ids[a:b].tolist()), tuple(lab[a:b].tolist())))
    return sorted(out)


def _one_streamed_epoch_equals_in_memory(tok, f, cache):
    """Every document once, tokenized and labelled exactly as the in-memory path does. One row per
    global batch, so no incomplete last batch is dropped and the two must be equal."""
    mem = build_data(_cfg([f], cache), tok, micro_batch_size=1, seed=0)
    arr = mem.train_loader.arrays
    expected = _packed_documents(zip(arr["input_ids"], arr["labels"], arr["position_ids"]))
    assert len(expected) == len(ROWS)
    loader = build_data(
        _cfg([f], cache, streaming=True, stream_buffer_rows=4), tok, micro_batch_size=1, seed=0
    ).train_loader
    streamed = []
    for batch in loader:
        if loader.state_dict()["epoch"] == 1:  # the first batch of the next epoch
            break
        streamed += _packed_documents(zip(batch["input_ids"], batch["labels"], batch["position_ids"]))
    assert sorted(streamed) == expected


def test_streaming_matches_in_memory_documents(tok, write_jsonl, cache):
    f = write_jsonl("t.jsonl", ROWS)
    _one_streamed_epoch_equals_in_memory(tok, f, cache)
    g = write_jsonl("e.jsonl", ROWS[:7])
    kw = dict(eval_files=[g], stream_buffer_rows=4)
    mem = build_data(_cfg([f], cache, **kw), tok, micro_batch_size=2, seed=0)
    stream = build_data(_cfg([f], cache, streaming=True, **kw), tok, micro_batch_size=2, seed=0)
    seen = []
    it = iter(stream.train_loader)
    first = next(it)
    assert first["input_ids"].shape == (2, 64)
    # one epoch of the stream holds every document once (the last incomplete global batch aside)
    for batch in [first] + [next(it) for _ in range(len(mem.train_loader) - 2)]:
        for ids, pos in zip(batch["input_ids"], batch["position_ids"]):
            starts = (pos == 0).nonzero().flatten().tolist() + [64]
            seen += [
                tok.decode(ids[a : b - 1].tolist()) for a, b in zip(starts[:-1], starts[1:]) if ids[a] != tok.pad_id
            ]
    # (a whole epoch was compared document by document above)
    assert len(seen) == len(set(seen)) and set(seen) <= set(_docs(mem, tok))
    state = stream.train_loader.state_dict()
    want = next(it)
    again = build_data(_cfg([f], cache, streaming=True, **kw), tok, micro_batch_size=2, seed=0).train_loader
    again.load_state_dict(state)
    got = next(iter(again))
    assert all((got[k] == want[k]).all() for k in want)
    eval_rows = sum(b["input_ids"].shape[0] for b in stream.eval_loader)
    assert eval_rows >= 1


def test_hub_dataset_not_in_cache_is_a_clear_offline_error(tok, cache):
    with pytest.raises(DataError, match=r"hf:someone/not-cached.*from the local cache, offline"):
        build_data(_cfg(["hf:someone/not-cached@train"], cache), tok, micro_batch_size=1, seed=0)
