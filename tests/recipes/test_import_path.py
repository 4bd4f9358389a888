"""Recipe subprocesses run this checkout's persimmon_train, whatever else is on the path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, recipe_env

pytestmark = pytest.mark.slow  # a child process's import path

PROBE = "import persimmon_train; print(persimmon_train.__file__)"


def test_children_import_the_checkout_not_a_shadowing_copy(tmp_path, monkeypatch):
    decoy = tmp_path / "installed"
    (decoy / "persimmon_train").mkdir(parents=True)
    (decoy / "persimmon_train" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(decoy))  # an older copy first on the path
    env = recipe_env(tmp_path)
    # A script outside the checkout, like recipes/x.py: sys.path[0] is its own folder.
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(REPO / "persimmon_train" / "__init__.py")
