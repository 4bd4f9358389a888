"""The embedded demo: a shipped chat corpus and a sentencepiece model trained from it.

``demo/`` (package data) holds ``train.jsonl``, ``eval.jsonl``, ``preference_train.jsonl``,
``preference_eval.jsonl`` and ``tokenizer.model``. If the
model file is absent (e.g. deleted to rebuild it), it is trained deterministically on first use
into ``$PERSIMMON_TRAIN_CACHE/demo`` (default ``~/.cache/persimmon_train/demo``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_VOCAB_SIZE = 1024


@dataclass(frozen=True)
class DemoAssets:
    tokenizer_path: str
    train_files: list
    eval_files: list
    preference_train_files: list = ()  # {"prompt", "chosen", "rejected"} rows (dpo, reward)
    preference_eval_files: list = ()


def _cache_root(cache_dir) -> Path:
    if cache_dir:
        return Path(cache_dir)
    root = os.environ.get("PERSIMMON_TRAIN_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "persimmon_train") / "demo"


def demo_assets(cache_dir=None) -> DemoAssets:
    train, eval_ = DEMO_DIR / "train.jsonl", DEMO_DIR / "eval.jsonl"
    shipped = DEMO_DIR / "tokenizer.model"
    if shipped.is_file():
        tok = shipped
    else:
        tok = _cache_root(cache_dir) / f"tokenizer-{DEMO_VOCAB_SIZE}.model"
        if not tok.is_file():
            from persimmon_train.data.train_tokenizer import train_tokenizer

            tmp = tok.with_suffix(f".tmp{os.getpid()}.model")
            train_tokenizer([train], tmp, vocab_size=DEMO_VOCAB_SIZE)
            os.replace(tmp, tok)
    prefs = [str(DEMO_DIR / "preference_train.jsonl")], [str(DEMO_DIR / "preference_eval.jsonl")]
    return DemoAssets(str(tok), [str(train)], [str(eval_)], *prefs)
