"""Command: train a small sentencepiece model from local text files.

    python -m persimmon_train.data.train_tokenizer --input a.txt b.jsonl --out tok.model --vocab-size 2048

(.txt: one sentence per line; .jsonl/.json: every string field of every row.)
"""

from __future__ import annotations

import argparse

from persimmon_train.data.tokenizer import Tokenizer
from persimmon_train.data.tokenizer_training import train_tokenizer
from persimmon_train.errors import DataError


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
        print(f"error: {e}")
        return 1
    print(Tokenizer(path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
