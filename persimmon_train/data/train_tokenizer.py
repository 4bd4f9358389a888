"""Train a small sentencepiece model from local text files (for the demo and for tests).

    python -m persimmon_train.data.train_tokenizer --input a.txt b.jsonl --out tok.model --vocab-size 2048

(.txt: one sentence per line; .jsonl/.json: every string field of every row.) The model mirrors the
released Persimmon tokenizer's shape: unigram, byte fallback (no unknown characters), ``|ENDOFTEXT|``
as a user-defined piece (used as bos/eos by :class:`Tokenizer`), newline as its own piece, digits
split, identity normalisation so text round-trips. Training is single-threaded with input shuffling
off, so the same files give the same model bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import sentencepiece as spm

from persimmon_train.data.tokenizer import ENDOFTEXT, Tokenizer
from persimmon_train.errors import EXIT_USER_ERROR, DataError, first_line


def _strings(value):
    """Every string inside a JSON value (texts, prompts, responses, message contents, words)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def _lines_of(path: Path):
    """Sentences for the trainer: one per line of text (sentencepiece reads line by line)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix in (".jsonl", ".json"):
                if path.suffix == ".json":
                    rows = json.load(f)
                    rows = rows if isinstance(rows, list) else [rows]
                else:
                    rows = (json.loads(line) for line in f if line.strip())
                for row in rows:
                    for s in _strings(row):
                        yield from s.splitlines()
            else:
                for line in f:
                    yield line.rstrip("\n")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: cannot read as text for tokenizer training ({e})") from None


def train_tokenizer(
    files, out_path, vocab_size: int = 2048, *, model_type: str = "unigram", extra_symbols: tuple[str, ...] = ()
) -> Path:
    """Train a sentencepiece model on ``files`` (.txt lines; .jsonl/.json: every string field).

    Returns the path of the written ``.model`` file (``out_path``; a folder gets ``tokenizer.model``).
    """
    out = Path(out_path)
    if out.is_dir() or out.suffix != ".model":
        out = out / "tokenizer.model"
    out.parent.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
    for f in files:
        if not f.is_file():
            raise DataError(f"tokenizer training file not found: {f}")
    lines = [line for f in files for line in _lines_of(f) if line.strip()]
    if not lines:
        raise DataError(f"no text to train a tokenizer on in {', '.join(map(str, files))}")
    model = io.BytesIO()
    try:
        # sentence_iterator + model_writer: no temporary paths end up inside the model proto,
        # so the same input gives byte-identical model files
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=1.0,
            user_defined_symbols=[ENDOFTEXT, "\n", *extra_symbols],
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            num_threads=1,
            shuffle_input_sentence=False,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"sentencepiece training on {', '.join(map(str, files))} failed: {e}") from None
    out.write_bytes(model.getvalue())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help=".txt / .jsonl / .json files")
    ap.add_argument("--out", required=True, help="output .model path (or a folder)")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    args = ap.parse_args(argv)
    try:
        path = train_tokenizer(args.input, args.out, args.vocab_size, model_type=args.model_type)
    except DataError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(Tokenizer(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
