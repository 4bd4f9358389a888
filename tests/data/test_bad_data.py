"""Every bad-data case raises a DataError naming the file, row and field (or is skipped, counted)."""

import logging

import pytest

from persimmon_train.data import DataConfig, Tokenizer, build_data
from persimmon_train.errors import DataError

GOOD = {"prompt": "What is 1 plus 1?", "response": "2."}


def _build(tok, files, cache, **kw):
    kw.setdefault("format", "chat")
    cfg = DataConfig(train_files=files, seq_len=64, cache_dir=cache, **kw)
    return build_data(cfg, tok, micro_batch_size=1, seed=0)


@pytest.mark.parametrize(
    "row,field,message",
    [
        ({"prompt": "hi"}, "response", "is missing"),
        ({"prompt": "hi", "response": 42}, "response", "expected a string, got int"),
        ({"prompt": "hi", "response": "   "}, "response", "is empty"),
        ({"question": "hi", "response": "x"}, "prompt", "is missing"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
            r"messages\[1\]\.role",
            "expected one of",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            r"messages\[0\]",
            "the conversation ends with a user message",
        ),
    ],
)
def test_chat_row_errors_name_file_row_field(tok, write_jsonl, cache, row, field, message):
    f = write_jsonl("chat.jsonl", [GOOD, GOOD, row, GOOD])
    with pytest.raises(DataError, match=rf"chat\.jsonl row 3, field '{field}': {message}"):
        _build(tok, [f], cache)


def test_text_wrong_type_and_malformed_json(tok, write_jsonl, cache):
    f = write_jsonl("t.jsonl", [{"text": "ok"}, {"text": ["a", "list"]}])
    with pytest.raises(DataError, match=r"t\.jsonl row 2, field 'text': expected a string, got list"):
        _build(tok, [f], cache, format="text")
    g = write_jsonl("u.jsonl", [{"text": "ok"}, '{"text": "unterminated'])
    with pytest.raises(DataError, match=r"u\.jsonl row 2: is not a valid JSON object"):
        _build(tok, [g], cache, format="text")


def test_label_outside_label_set(tok, write_jsonl, cache):
    f = write_jsonl("cls.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(DataError, match=r"cls\.jsonl row 2, field 'label': label 'meh' is not in the label set"):
        _build(tok, [f], cache, format="classification", labels=["neg", "pos"])
    # collected label set: an eval label never seen in training
    e = write_jsonl("ev.jsonl", [{"text": "c", "label": "pos"}, {"text": "d", "label": "surprise"}])
    with pytest.raises(DataError, match=r"ev\.jsonl row 2, field 'label': label 'surprise' is not in the label set"):
        build_data(
            DataConfig(
                train_files=[write_jsonl("tr.jsonl", [{"text": "a", "label": "pos"}])],
                eval_files=[e],
                format="classification",
                seq_len=64,
                cache_dir=cache,
            ),
            tok,
            micro_batch_size=1,
            seed=0,
        )
    t = write_jsonl("tags.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "B-X"]}, {"tokens": ["a"], "tags": ["Q"]}])
    with pytest.raises(DataError, match=r"tags\.jsonl row 2, field 'tags\[0\]': label 'Q' is not in the label set"):
        _build(tok, [t], cache, format="token_classification", labels=["O", "B-X"])
    m = write_jsonl("ids.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 5}])
    with pytest.raises(DataError, match=r"ids\.jsonl row 2, field 'label': label id 5 is outside the label set"):
        _build(tok, [m], cache, format="classification", labels=["x", "y"])


def test_token_classification_length_mismatch(tok, write_jsonl, cache):
    f = write_jsonl("tc.jsonl", [{"tokens": ["a", "b", "c"], "tags": ["O", "O"]}])
    with pytest.raises(DataError, match=r"tc\.jsonl row 1, field 'tags': has 2 tags for 3 words"):
        _build(tok, [f], cache, format="token_classification")


def test_skip_mode_counts_and_logs(tok, write_jsonl, cache, caplog):
    f = write_jsonl("chat.jsonl", [GOOD, {"prompt": "x"}, GOOD, {"prompt": "x", "response": 3}, GOOD])
    with caplog.at_level(logging.WARNING, logger="persimmon_train.data"):
        b = _build(tok, [f], cache, on_bad_row="skip")
    assert b.stats["skipped_rows"] == 2
    assert b.stats["train"]["documents"] == 3
    assert "chat.jsonl row 2, field 'response': is missing" in caplog.text
    assert "skipped 2 bad rows" in caplog.text


def test_tokenizer_missing_or_corrupt(tmp_path, write_jsonl, cache):
    f = write_jsonl("t.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=r"tokenizer file not found: .*missing\.model"):
        build_data(
            DataConfig(train_files=[f], cache_dir=cache), str(tmp_path / "missing.model"), micro_batch_size=1, seed=0
        )
    bad = tmp_path / "corrupt.model"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(DataError, match=r"corrupt\.model is not a valid sentencepiece model"):
        Tokenizer(bad)


def test_file_not_what_its_extension_says(tok, tmp_path, cache):
    p = tmp_path / "data.parquet"
    p.write_text('{"text": "I am JSON, not parquet"}\n')
    with pytest.raises(DataError, match=r"data\.parquet: cannot read as parquet"):
        _build(tok, [str(p)], cache, format="text")
    j = tmp_path / "data.jsonl"
    j.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    with pytest.raises(DataError, match=r"data\.jsonl: cannot read as jsonl"):
        _build(tok, [str(j)], cache, format="text")
    c = tmp_path / "data.csv"
    c.write_bytes(b"PK\x03\x04\xff\xfe\x00\x00zip, not csv")
    with pytest.raises(DataError, match=r"data\.csv"):
        _build(tok, [str(c)], cache, format="text")


def test_missing_file_and_empty_glob(tok, tmp_path, cache):
    with pytest.raises(DataError, match="data file not found: .*nothere.jsonl"):
        _build(tok, [str(tmp_path / "nothere.jsonl")], cache)
    with pytest.raises(DataError, match=r"matches no files"):
        _build(tok, [str(tmp_path / "*.parquet")], cache)
