"""Helpers for recipe tests: run `python recipes/<job>.py ...` for real, and toy learnable data."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A small, fast model and settings shared by the recipe tests (fp32: numbers are compared).
FAST = [
    "trainer.precision=fp32",
    "trainer.progress_bar=false",
    "model.hidden_size=64",
    "model.intermediate_size=256",
    "model.num_attention_heads=4",
    "model.num_hidden_layers=2",
    "data.seq_len=64",
    "trainer.micro_batch_size=8",
    "export.dtype=fp32",
]


def recipe_env(tmp_path: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update(
        PERSIMMON_TRAIN_CACHE=str(tmp_path / "cache"),
        WANDB_DIR=str(tmp_path / "wandb_dir"),
        WANDB_MODE="offline",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
    )
    env.pop("WANDB_API_KEY", None)
    # `python recipes/x.py` puts recipes/ first on sys.path, not the checkout: without this an
    # installed copy of persimmon_train (site-packages, another checkout's editable install, a
    # mutation-check copy's original) would be what the child runs.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def run_recipe(job: str, *overrides: str, env: dict, timeout: float = 300, check: bool = True):
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / f"{job}.py"), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{job} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


def read_metrics(output_dir: Path) -> list[dict]:
    with open(output_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_losses(output_dir: Path) -> list[float]:
    return [row["eval_loss"] for row in read_metrics(output_dir) if "eval_loss" in row]


def _write_jsonl(path: Path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


POSITIVE = ["good", "great", "happy", "love", "fine", "nice"]
NEGATIVE = ["bad", "awful", "sad", "hate", "poor", "ugly"]
FILLER = ["the", "a", "day", "food", "movie", "was", "it", "very", "and", "this", "book", "really"]


@pytest.fixture(scope="session")
def classification_files(tmp_path_factory) -> tuple[str, str]:
    """Sentiment by keyword, placed last (where the head pools): learnable in a few dozen steps."""
    root = tmp_path_factory.mktemp("cls")
    rng = random.Random(0)

    def rows(n):
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
            yield {"text": " ".join(words), "label": label}

    return _write_jsonl(root / "train.jsonl", rows(400)), _write_jsonl(root / "eval.jsonl", rows(64))


# Words whose first sentencepiece of the demo tokenizer is the whole word: the tag sits on a word's
# first piece and the model is causal, so that piece must identify the word.
ANIMALS = ["tiger", "monkey", "rabbit", "dragon"]
COUNTRIES = ["Poland", "Brazil", "Sweden", "Japan", "Spain", "Norway"]
OBJECTS = ["apple", "stone", "forest", "button", "garden", "window", "river", "planet", "cookie", "basket"]


@pytest.fixture(scope="session")
def tagging_files(tmp_path_factory) -> tuple[str, str]:
    """Animals are B-ANI, countries B-LOC, "<country> island" is B-LOC I-LOC, the rest O."""
    root = tmp_path_factory.mktemp("tag")
    rng = random.Random(1)

    def rows(n):
        for _ in range(n):
            tokens, tags = [], []
            for _ in range(rng.randint(4, 8)):
                kind = rng.random()
                if kind < 0.2:
                    tokens.append(rng.choice(ANIMALS))
                    tags.append("B-ANI")
                elif kind < 0.3:
                    tokens.append(rng.choice(COUNTRIES))
                    tags.append("B-LOC")
                elif kind < 0.4:
                    tokens += [rng.choice(COUNTRIES), "island"]
                    tags += ["B-LOC", "I-LOC"]
                else:
                    tokens.append(rng.choice(OBJECTS))
                    tags.append("O")
            yield {"tokens": tokens, "tags": tags}

    return _write_jsonl(root / "train.jsonl", rows(400)), _write_jsonl(root / "eval.jsonl", rows(64))
