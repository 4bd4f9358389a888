"""Preemption and restarts of a real 2-rank FSDP2 run (gloo, launch/torchrun.sh): SIGTERM to one
rank stops both after the same step with a valid checkpoint and exit code 3, and resume=auto then
finishes; under MAX_RESTARTS=1 a SIGKILLed rank is restarted by torchrun, which continues from the
newest valid checkpoint by itself. Both end equal to the uninterrupted run (JOBS["fsdp"]) within
the 2-rank fp32 tolerance (two uninterrupted gloo runs already differ in the last bits)."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil
import pytest

from persimmon_train.storage import validate_checkpoint
from tests.helpers import JOBS, REPO, STEPS, launch, launch_command, train_losses, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REL = 1e-4


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "python" in child.name():
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} process under {launcher.pid}")


def _start(out, env):
    cmd, env = launch_command(out, JOBS["fsdp"], env, nproc=2)
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _finish(proc, timeout=300) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return output


def _assert_matches(reference, out):
    ref, got = train_losses(reference), train_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in ref)
    print(f"PREEMPT {out.name}: max rel |loss diff| vs uninterrupted {worst:.2e}")
    assert worst <= REL, f"{got} vs {ref}"


def test_sigterm_to_one_rank_stops_both_with_a_checkpoint_then_resume_auto(runs, tmp_path):
    reference = runs.get("fsdp")
    out = tmp_path / "sigterm"
    proc = _start(out, runs.env)
    try:
        wait_for(out / "checkpoints" / "step_5", proc, timeout=300)
        os.kill(_rank_pid(proc, 1), signal.SIGTERM)  # rank 1 only: rank 0 learns it at the step boundary
    finally:
        output = _finish(proc)
    # torchrun reports each rank's own exit code: both stopped early, neither failed nor was killed.
    assert output.count("exitcode  : 3") == 2, output[-4000:]
    log = (out / "train.log").read_text()
    line = next(x for x in log.splitlines() if "SIGTERM: stopping after step" in x)
    step = int(line.split("stopping after step ")[1].split()[0])
    assert 5 <= step < STEPS and str(out / "checkpoints" / f"step_{step}") in line
    validate_checkpoint(str(out / "checkpoints" / f"step_{step}"))
    assert max(train_losses(out)) == step and not (out / "final").exists()

    launch(out, [*JOBS["fsdp"], "resume=auto"], runs.env)
    assert f"resume=auto: resuming from {out / 'checkpoints' / f'step_{step}'}" in (out / "train.log").read_text()
    _assert_matches(reference, out)


def test_torchrun_restarts_a_killed_rank_and_continues_by_itself(runs, tmp_path):
    reference = runs.get("fsdp")
    out = tmp_path / "restarted"
    # One restart allowed: the restarted group must connect at its first try. It joins the same
    # agent store as the killed one (parallel/distributed.py attempt_store keeps them apart).
    proc = _start(out, {**runs.env, "MAX_RESTARTS": "1"})
    try:
        wait_for(out / "checkpoints" / "step_5", proc, timeout=300)
        os.kill(_rank_pid(proc, 1), signal.SIGKILL)
    finally:
        output = _finish(proc, timeout=400)
    assert proc.returncode == 0, output[-4000:]
    log = (out / "train.log").read_text()
    assert f"resume=auto: resuming from {out / 'checkpoints' / 'step_5'}" in log, log[-3000:]
    assert (out / "final" / "model.safetensors").exists()
    _assert_matches(reference, out)


def test_async_checkpoints_on_2_ranks(runs, tmp_path):
    """checkpoint.async_save=true on 2 FSDP2 ranks: every checkpoint validates, training is unchanged."""
    out = tmp_path / "async"
    launch(out, [*JOBS["fsdp"], "checkpoint.async_save=true"], runs.env)
    for step in (5, 10):
        validate_checkpoint(str(out / "checkpoints" / f"step_{step}"))
    _assert_matches(runs.get("fsdp"), out)
