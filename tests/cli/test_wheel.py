"""The wheel works outside the checkout: built from this tree, installed into a fresh venv, and run
as `persimmon-train` from an empty folder (the config tree, recipes and demo data ship inside).

Offline and fast: `pip wheel --no-build-isolation --no-deps` (setuptools from this venv), a venv
without pip whose only link to this one is a .pth naming its site-packages (torch & co.), so the
editable install's path hook (a .pth *inside* that folder) is not processed and `persimmon_train`
can only come from the wheel; pip of this venv installs into it with `--python`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import REPO, read_metrics, recipe_env


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installs_and_runs_from_an_empty_folder(tmp_path):
    # Build from a copy of the sources, so nothing (build/, egg-info) is written into the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(
        REPO / "persimmon_train", src / "persimmon_train", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("persimmon_train-*.whl"))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    python = venv / "bin" / "python"
    venv_site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    Path(venv_site, "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        timeout=300,
    )

    empty = tmp_path / "empty"
    empty.mkdir()
    env = recipe_env(tmp_path)
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = _run([str(python), "-c", "import persimmon_train; print(persimmon_train.__file__)"], cwd=empty, env=env)
    assert where.stdout.strip().startswith(venv_site), where.stdout  # the wheel, not the checkout

    listing = _run(["persimmon-train", "ls"], cwd=empty, env=env, timeout=120)
    assert "finetune" in listing.stdout and "lora_chat_16k" in listing.stdout
    assert f"configs ({venv_site}" in listing.stdout  # the config tree inside the installed package

    run = _run(
        ["persimmon-train", "finetune", "trainer.max_steps=2", "trainer.progress_bar=false"],
        cwd=empty,
        env=env,
        timeout=600,
    )
    assert "finetune: 2 steps" in run.stdout
    (out,) = (empty / "outputs" / "finetune").iterdir()
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]
    assert (out / "final" / "config.json").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["outputs"]  # nothing else written beside the run
