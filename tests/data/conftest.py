import json
from pathlib import Path

import pytest

from persimmon_train.data import Tokenizer, demo_assets


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    """The shipped demo tokenizer (unigram, byte fallback, |ENDOFTEXT| as bos/eos)."""
    return Tokenizer(demo_assets().tokenizer_path)


@pytest.fixture
def write_jsonl(tmp_path):
    def write(name: str, rows) -> str:
        p = Path(tmp_path) / name
        with open(p, "w", encoding="utf-8") as f:
            for r in rows:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        return str(p)

    return write


@pytest.fixture
def cache(tmp_path) -> str:
    return str(Path(tmp_path) / "cache")
