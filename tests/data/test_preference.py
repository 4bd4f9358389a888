"""Preference rows: the SFT chat format on both sides, bad rows named, pairs packed whole."""

import numpy as np
import pytest

from persimmon_train.data import DataConfig, build_data
from persimmon_train.data.preference import PairStats, fit_pair, pack_pairs
from persimmon_train.errors import DataError
from persimmon_train.model.loss import IGNORE_INDEX

PAIR = {"prompt": "What is 2 plus 2?", "chosen": "2 plus 2 is 4.", "rejected": "2 plus 2 is 5."}


def _build(tok, files, cache, **kw):
    cfg = DataConfig(train_files=files, format="preference", seq_len=kw.pop("seq_len", 128), cache_dir=cache, **kw)
    return build_data(cfg, tok, micro_batch_size=1, seed=0)


def _docs(batch):
    """(tokens, labelled tokens) of each document of each row, in doc-id order."""
    out = []
    for ids, labels, docs in zip(batch["input_ids"], batch["labels"], batch["doc_ids"]):
        for d in range(int(docs.max()) + 1):
            sel = docs == d
            out.append((ids[sel].tolist(), [t for t in labels[sel].tolist() if t != IGNORE_INDEX]))
    return out


def test_string_and_message_rows_tokenise_as_sft_chat(tok, write_jsonl, cache):
    msgs = {
        "chosen": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "4."},
        ],
    }
    msgs["rejected"] = msgs["chosen"][:-1] + [{"role": "assistant", "content": "5."}]
    f = write_jsonl("p.jsonl", [dict(PAIR, system="Be brief."), msgs])
    batch = next(iter(_build(tok, [f], cache, seq_len=512).train_loader))
    docs = _docs(batch)
    assert len(docs) == 4  # both pairs in one row: chosen, rejected, chosen, rejected
    # the SFT chat format: the same tokens a chat-format row with that response gives
    expect = {}
    for resp in ("2 plus 2 is 4.", "2 plus 2 is 5."):
        ids, mask = tok.encode_chat([(PAIR["prompt"], resp)], system="Be brief.", bos=tok.bos_id != tok.eos_id)
        expect[resp] = (ids, [t for t, m in zip(ids, mask) if m])
    for resp in ("4.", "5."):
        ids, _ = tok.encode_chat(
            [("Hi", "Hello."), (PAIR["prompt"], resp)], system="Be brief.", bos=tok.bos_id != tok.eos_id
        )
        expect[resp] = (ids, tok.encode(resp) + [tok.eos_id])  # only the last response is scored
    assert sorted(map(str, docs)) == sorted(map(str, expect.values()))
    # chosen (even id) and rejected (odd id) of a pair are separate documents: positions restart
    pos, d = batch["position_ids"][0], batch["doc_ids"][0]
    starts = [int(pos[d == k][0]) for k in range(4)]
    assert starts == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "row,field,message",
    [
        ({"prompt": "hi", "chosen": "a"}, "rejected", "is missing"),
        ({"chosen": "a", "rejected": "b"}, "prompt", "is missing"),
        ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "rejected", "is the same as 'chosen'"),
        ({"prompt": "hi", "chosen": "  ", "rejected": "b"}, "chosen", "is empty"),
        (
            {
                "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "ho"}, {"role": "assistant", "content": "b"}],
            },
            "rejected",
            "does not share the conversation",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
                "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}],
            },
            r"chosen\[1\]\.content",
            "is empty",
        ),
    ],
)
def test_bad_rows_name_file_row_field(tok, write_jsonl, cache, row, field, message):
    f = write_jsonl("pref.jsonl", [PAIR, row, PAIR])
    with pytest.raises(DataError, match=rf"pref\.jsonl row 2, field '{field}': {message}"):
        _build(tok, [f], cache)


def test_bad_rows_skipped_and_counted(tok, write_jsonl, cache):
    f = write_jsonl("pref.jsonl", [PAIR, {"prompt": "x", "chosen": "a", "rejected": "a"}, PAIR])
    bundle = _build(tok, [f], cache, on_bad_row="skip")
    assert bundle.stats["skipped_rows"] == 1 and bundle.stats["train"]["pairs"] == 2


def test_pairs_kept_whole_and_long_pairs_truncated_or_dropped():
    rng = np.random.default_rng(0)
    pairs = [
        (
            list(rng.integers(3, 50, rng.integers(1, 20))),
            list(rng.integers(3, 50, rng.integers(1, 9))),
            list(rng.integers(3, 50, rng.integers(1, 9))),
        )
        for _ in range(40)
    ]
    arrays, stats = pack_pairs(pairs, 40, 0, "split")
    docs = arrays["doc_ids"]
    for r in range(docs.shape[0]):
        n = docs[r].max() + 1
        assert n % 2 == 0  # whole pairs only
        for d in range(n):  # each document contiguous, positions restart, first token unlabelled
            cols = np.nonzero(docs[r] == d)[0]
            assert (np.diff(cols) == 1).all() and arrays["position_ids"][r, cols[0]] == 0
            assert arrays["labels"][r, cols[0]] == IGNORE_INDEX
    long = sum(2 * len(p) + len(c) + len(j) > 40 for p, c, j in pairs)
    assert long and stats.truncated_pairs + stats.dropped_pairs == long
    assert stats.pairs == 40 and int((docs >= 0).sum()) == stats.real_tokens
    _, dropped = pack_pairs(pairs, 40, 0, "drop")
    assert dropped.dropped_pairs == long and dropped.truncated_pairs == 0
    # truncation cuts the prompt from the left and keeps both responses whole
    s = PairStats()
    c, r, p = fit_pair(list(range(10, 30)), [1, 2, 3], [4, 5], 20, "split", s)
    assert (c, r, p) == ([23, 24, 25, 26, 27, 28, 29, 1, 2, 3], [23, 24, 25, 26, 27, 28, 29, 4, 5], 7)
    assert fit_pair([9], [1] * 15, [2] * 5, 20, "split", s) is None and s.dropped_pairs == 1
