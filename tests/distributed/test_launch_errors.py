"""A config error under torchrun: one `error:` line for the whole launch (rank 0's, also when
torchrun restarts the group and it fails again), and torchrun's own failure report names it as the
root cause instead of showing a Python traceback."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import REPO, launch_command, recipe_env

pytestmark = pytest.mark.distributed  # one 2-rank torchrun launch restarted once, ~15 s


def test_config_error_under_torchrun_is_one_line_and_the_launcher_names_it(tmp_path):
    out = tmp_path / "out"
    cmd, env = launch_command(
        out, ["strategy=fsdp", "trainer.num_threads=-1"], recipe_env(tmp_path, MAX_RESTARTS="1"), nproc=2
    )
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: trainer.num_threads:"), proc.stderr[-4000:]
    # torchrun's ChildFailedError report: its "traceback :" field carries our line, not a Python traceback
    assert "traceback : error: trainer.num_threads:" in proc.stderr, proc.stderr[-4000:]
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-4000:]
    assert not out.exists()
