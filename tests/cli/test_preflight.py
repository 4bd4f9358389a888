"""Fail fast: mistakes that config.json, the tokenizer or a directory listing reveal stop the run
before data preparation (hours on a real corpus), in well under a second, writing nothing."""

from __future__ import annotations

import json
import time

import pytest

from persimmon_train import cli
from persimmon_train.errors import PersimmonTrainError
from tests.helpers import assert_one_line_error, demo_tokenizer, run_in_process, save_tiny_base, tiny_config


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    """A tiny HF folder whose config.json allows 512 positions, with the demo tokenizer beside it."""
    folder = tmp_path_factory.mktemp("base512")
    tokenizer = demo_tokenizer()
    config = tiny_config(
        tokenizer,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=512,
    )
    save_tiny_base(folder, tokenizer, config, seed=0)
    return folder


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(2000):
            f.write(json.dumps({"prompt": f"question {i}", "response": f"answer {i} " * 20}) + "\n")
    return path


@pytest.fixture
def no_data_preparation(monkeypatch):
    """Any call into data preparation fails the test: the checks must come first."""
    import persimmon_train.data
    import persimmon_train.data.build

    def prepared(*args, **kwargs):
        raise AssertionError("data preparation started before the cheap checks")

    monkeypatch.setattr(persimmon_train.data, "build_data", prepared)
    monkeypatch.setattr(persimmon_train.data.build, "build_data", prepared)


def _write_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "case, overrides, message",
    [
        (
            "positions",
            ["experiment=lora_chat_16k"],
            r"data\.seq_len: 16384 is above .*config\.json max_position_embeddings=512",
        ),
        ("vocab", ["data.seq_len=256"], r"model\.vocab_size: the model has 100 token embeddings but the tokenizer"),
        (
            "missing data",
            ["data.seq_len=256", "data.eval_files=[/nowhere/eval.jsonl]"],
            r"data file not found: /nowhere/eval\.jsonl",
        ),
        ("missing tokenizer", ["data.seq_len=256", "tokenizer.path=/nowhere/tokenizer.model"], r"tokenizer\.path"),
    ],
)
def test_cheap_mistakes_stop_the_run_before_data_preparation(
    case, overrides, message, small_base, corpus, tmp_path, no_data_preparation, monkeypatch
):
    from persimmon_train.training.run import train

    base = small_base
    if case == "vocab":
        base = tmp_path / "small_vocab"
        base.mkdir()
        for f in small_base.iterdir():
            (base / f.name).write_bytes(f.read_bytes())
        _write_config(base, vocab_size=100)
    out = tmp_path / "out"
    cfg = cli.load_config(
        "finetune",
        [f"model.path={base}", f"data.train_files=[{corpus}]", f"output_dir={out}", "tracker=none", *overrides],
    )
    started = time.perf_counter()
    with pytest.raises(PersimmonTrainError, match=message):
        train(cfg, "finetune")
    assert time.perf_counter() - started < 1.0  # config.json + a sentencepiece file, not the corpus
    assert not out.exists()


def test_issue_command_exits_2_before_tokenizing(small_base, corpus, tmp_path, monkeypatch):
    """`experiment=lora_chat_16k` over a 512-position base: one line, exit 2, nothing cached or written."""
    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    ran = run_in_process(
        "finetune",
        "experiment=lora_chat_16k",
        f"model.path={small_base}",
        f"data.train_files=[{corpus}]",
        f"output_dir={out}",
    )
    line = assert_one_line_error(ran, "error: data.seq_len: 16384 is above", "max_position_embeddings=512")
    assert line.startswith("error: data.seq_len: 16384 is above") and "tokenizing" not in ran.stderr
    assert not out.exists() and not list((tmp_path / "cache").glob("data/*/meta.json"))


def test_tokenizer_as_large_as_the_vocabulary_is_accepted_one_piece_more_is_not(small_base, corpus, tmp_path):
    """The released 8B has exactly as many embeddings as its tokenizer has pieces: accepted. A
    tokenizer with a single piece the embeddings cannot hold is refused."""
    from persimmon_train.errors import ConfigError
    from persimmon_train.training.preflight import check_model_and_tokenizer

    pieces = demo_tokenizer().vocab_size
    assert json.loads((small_base / "config.json").read_text())["vocab_size"] == pieces
    overrides = [f"model.path={small_base}", f"data.train_files=[{corpus}]", "data.seq_len=256"]
    check_model_and_tokenizer(cli.load_config("finetune", overrides))  # equal sizes: no error

    smaller = tmp_path / "one_short"
    smaller.mkdir()
    for f in small_base.iterdir():
        (smaller / f.name).write_bytes(f.read_bytes())
    _write_config(smaller, vocab_size=pieces - 1)
    overrides[0] = f"model.path={smaller}"
    with pytest.raises(ConfigError, match=rf"model\.vocab_size: the model has {pieces - 1} token embeddings"):
        check_model_and_tokenizer(cli.load_config("finetune", overrides))
