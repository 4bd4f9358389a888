"""A DeepSpeed run on CPU leaves no shared memory behind, even when it is SIGKILLed mid-run.

DeepSpeed's CPU shm op maps a 66 MB all-reduce workspace per rank under /dev/shm and never unlinks
it: before the fix every 2-rank CPU run left 132 MB of RAM in /dev/shm until reboot (20 GB on the
development box after a day of tests, until it ran out of memory). DeepSpeedStrategy removes the
names right after init_distributed (parallel/deepspeed.py), so not even a killed run leaks.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.helpers import REPO, launch_command, wait_for

pytestmark = [pytest.mark.distributed, pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")]


def _workspaces() -> set[str]:
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_"
    return {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}


def test_killed_deepspeed_cpu_run_leaves_no_shared_memory(runs):
    before = _workspaces()
    out = runs.root / "shm_killed"
    overrides = ["strategy=deepspeed", "strategy.stage=2", "peft=none", "trainer.max_steps=1000"]
    cmd, env = launch_command(out, overrides, runs.env, nproc=2, launcher="deepspeed")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        # The first checkpoint (COMMON: every 5 steps): every rank is up and training. 600 s: a
        # fresh venv builds the shm op first (minutes).
        wait_for(out / "checkpoints" / "step_5", proc, timeout=600)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
        log = proc.communicate()[0]
    # The shm op was in use (else this test would prove nothing) ...
    assert "shm_comm" in log, log[-3000:]  # "DeepSpeed deepspeed_shm_comm... built successfully"
    # ... and its workspaces are gone with the processes. (Left ones are removed here, so a failure
    # or a mutation run does not keep their RAM.)
    leaked = _workspaces() - before
    for name in leaked:
        os.unlink(os.path.join("/dev/shm", name))
    assert leaked == set()
