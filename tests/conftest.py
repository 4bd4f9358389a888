import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import Runs

# Tests never reach a hub: fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# DeepSpeed's CPU accelerator JIT-builds its shared-memory op into TORCH_EXTENSIONS_DIR, guarded
# by a bare `lock` file that a killed build leaves behind, after which every later DeepSpeed launch
# waits on it forever. The default folder (~/.cache/torch_extensions) is shared by every venv and
# checkout of a machine, so one killed run elsewhere hung this suite. Unless told otherwise, the
# tests build into their own venv's folder: a fresh venv (CI) builds once and inherits no lock.
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    # In that folder a lock older than any build (3 minutes on 2 cores, 20+ under load) is a
    # leftover of a killed test run of this venv: drop it rather than wait on it.
    _lock = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "deepspeed_shm_comm", "lock")
    if os.path.exists(_lock) and time.time() - os.path.getmtime(_lock) > 45 * 60:
        os.remove(_lock)


# ------------------------------------------------------------------ the fast tier starts no process
#
# `-m "not slow and not distributed"` is the tier a developer runs before each commit: a test that
# starts a process (a recipe run, a launcher, a script, a wheel build) is marked `slow` (one
# process) or `distributed` (several ranks). An unmarked test that starts one fails here, in its
# set-up (a session fixture's run counts) or its body, naming the mark it needs (docs/testing.md).

_REAL_EXECUTE_CHILD = subprocess.Popen._execute_child

# Importing the storage package runs /sbin/ldconfig (ctypes.util.find_library finds libc): imported
# here, before any test, so that a file run alone does not start that process inside its first test.
import persimmon_train.storage.safetensors_io  # noqa: E402, F401


def _refuse_processes(nodeid: str):
    def execute_child(self, args, *rest, **kwargs):
        program = args[0] if isinstance(args, (list, tuple)) else str(args).split()[0]
        raise AssertionError(
            f"{nodeid} starts a process ({os.path.basename(str(program))}) but is not marked: "
            f"mark it @pytest.mark.slow (or distributed for several ranks); see docs/testing.md"
        )

    return execute_child


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _unmarked_start_no_process(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _unmarked_start_no_process(item)


def _unmarked_start_no_process(item):
    if item.get_closest_marker("slow") or item.get_closest_marker("distributed"):
        yield
        return
    subprocess.Popen._execute_child = _refuse_processes(item.nodeid)
    try:
        yield
    finally:
        subprocess.Popen._execute_child = _REAL_EXECUTE_CHILD


# ------------------------------------------------- toy learnable data (recipe and export tests)


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


# ------------------------------------------------ the 2-rank runs (tests/distributed, tests/export)


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    """2-rank CPU runs of the real recipes through launch/torchrun.sh (FSDP2 over gloo; ZeRO on
    DeepSpeed's CPU accelerator), each made at most once per session.
    The first DeepSpeed run on a fresh machine builds DeepSpeed's shared-memory op with ninja
    (minutes): its timeout is generous."""
    return Runs(tmp_path_factory.mktemp("dist"))
