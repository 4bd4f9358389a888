import json
import pickle
import subprocess
import sys

import pytest

from persimmon_train.data import Tokenizer
from persimmon_train.data.train_tokenizer import train_tokenizer
from persimmon_train.errors import DataError


def test_special_ids_come_from_endoftext_piece(tok):
    assert tok.id_to_piece(tok.eos_id) == "|ENDOFTEXT|"
    assert tok.bos_id == tok.eos_id
    assert tok.pad_id == tok.eos_id  # no pad piece in the model
    assert tok.encode("a|ENDOFTEXT|")[-1] == tok.eos_id


def test_roundtrip_with_newlines_and_unseen_characters(tok):
    text = "human: héllo ✓ 漢字\n\nadept: 12 + 30 = 42"
    ids = tok.encode(text, eos=True)
    assert ids[-1] == tok.eos_id
    assert tok.decode(ids[:-1]) == text  # byte fallback: nothing becomes <unk>
    assert tok.encode("x", bos=True)[0] == tok.bos_id


def test_special_ids_read_from_model_folder_config(tok, tmp_path):
    folder = tmp_path / "model"
    tok.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    t = Tokenizer(folder)
    assert (t.bos_id, t.eos_id) == (1, 2)
    (folder / "config.json").unlink()
    t = Tokenizer(folder)  # special_tokens_map.json written by save_pretrained
    assert (t.bos_id, t.eos_id, t.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_pickles_for_worker_processes(tok):
    t = pickle.loads(pickle.dumps(tok))
    assert t.encode("What is 2 plus 2?") == tok.encode("What is 2 plus 2?")
    assert t.fingerprint == tok.fingerprint


def test_chat_encoding_masks_prompt(tok):
    ids, mask = tok.encode_chat([("What is 2 plus 3?", "5.")])
    prompt = tok.encode("human: What is 2 plus 3?\n\nadept:")
    response = tok.encode("5.") + [tok.eos_id]
    assert ids == prompt + response
    assert mask == [False] * len(prompt) + [True] * len(response)
    assert tok.chat_prompt("hi") == "human: hi\n\nadept:"


def test_missing_and_corrupt_tokenizer_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer file not found: .*nope\.model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(DataError, match=r"tokenizer\.model is not a valid sentencepiece model"):
        Tokenizer(tmp_path)


@pytest.mark.slow
def test_train_tokenizer_is_deterministic_and_has_command(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} about the quick brown fox number {i * 7}\n" for i in range(300)))
    a = train_tokenizer([corpus], tmp_path / "a.model", vocab_size=300)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "persimmon_train.data.train_tokenizer",
            "--input",
            str(corpus),
            "--out",
            str(tmp_path / "b.model"),
            "--vocab-size",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert a.read_bytes() == (tmp_path / "b.model").read_bytes()
    t = Tokenizer(a)
    assert t.id_to_piece(t.eos_id) == "|ENDOFTEXT|"
    assert t.decode(t.encode("the quick fox 123\n")) == "the quick fox 123\n"


def test_train_tokenizer_command_reports_a_missing_file_in_one_line(tmp_path, capsys):
    """A user's mistake: exit 2, one `error:` line on stderr naming the file, nothing written."""
    from persimmon_train.data.train_tokenizer import main

    missing = tmp_path / "nope.txt"
    code = main(["--input", str(missing), "--out", str(tmp_path / "t.model"), "--vocab-size", "300"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"error: tokenizer training file not found: {missing}"]
    assert not (tmp_path / "t.model").exists()
