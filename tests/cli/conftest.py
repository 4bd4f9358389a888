"""Helpers for the `persimmon-train` command tests: run it the way a user would, from the checkout."""

from __future__ import annotations

import subprocess
import sys

from tests.recipes.conftest import FAST, REPO, read_metrics, recipe_env  # noqa: F401


def persimmon_train(*args: str, env: dict, cwd=REPO, timeout: float = 300, check: bool = True):
    """`persimmon-train ARGS` via `python -m persimmon_train.recipes` with the checkout first on the path."""
    env = dict(env, PYTHONPATH=str(REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    proc = subprocess.run(
        [sys.executable, "-m", "persimmon_train.recipes", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"persimmon-train {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc
