"""Stopping early on request, and knowing when a restart loops.

A scheduler that preempts or times out a job sends SIGTERM (Slurm, Kubernetes, torchrun's agent
passing on its own), SIGUSR1 (Slurm's `--signal=USR1@N` warning) or SIGINT (Ctrl-C). The
handlers installed here only record which signal came: nothing collective, no I/O. At each step
boundary every rank calls `StopFlag.poll`, one all-reduce of a few numbers (a one-hot vote per
reason), so all ranks agree to stop after the same step, even when only one rank was signalled.
`trainer.max_minutes` votes the same way, from rank 0's clock only. The trainer then writes a
checkpoint and the run ends with `EXIT_STOPPED_EARLY`; a checkpoint write in progress when a
signal arrives is never interrupted (the flag is read between steps only). A second SIGINT raises
KeyboardInterrupt at once.

`restarts.json` in output_dir counts the starts in a row that resumed from the same step after an
attempt that did not end by itself (it crashed or was killed): a job that fails before its next
checkpoint and is restarted by torchrun or Slurm again and again stops with one line once
`trainer.max_restarts_without_progress` is exceeded.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import torch

from persimmon_train.errors import ConfigError, StoppedEarly
from persimmon_train.storage.files import atomic_write_text

log = logging.getLogger("persimmon_train")

EXIT_STOPPED_EARLY = StoppedEarly.exit_code  # 3: stopped early, resumable (see docs/training.md)
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
TIME_BUDGET = "trainer.max_minutes"
REASONS = (*SIGNALS, TIME_BUDGET)  # the order of the vote vector (the first agreed reason is named)
RESTARTS_FILE = "restarts.json"
FINISHED = "finished"


class StopFlag:
    """Which stop was requested on this rank; `poll` makes every rank agree at a step boundary."""

    def __init__(self, max_minutes=None, is_main: bool = True, clock=time.monotonic, started: float | None = None):
        self.received: str | None = None  # the first signal's name, set by the handler
        self.clock = clock
        self.started = clock() if started is None else started  # a `clock()` reading
        self.max_seconds = None if max_minutes is None else float(max_minutes) * 60.0
        self.is_main = is_main  # only rank 0's clock votes for the time budget
        self._previous: dict[int, object] = {}

    # ------------------------------------------------------------------ handlers
    def install(self) -> StopFlag:
        """Install the handlers (main thread only: Python delivers signals there); `restore` undoes it."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM/SIGUSR1/SIGINT keep their default handlers")
            return self
        for name in SIGNALS:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received is not None:
            raise KeyboardInterrupt  # the second interrupt: stop now, no checkpoint
        if self.received is None:
            self.received = name

    # ------------------------------------------------------------------ agreement
    def over_budget(self) -> bool:
        return self.max_seconds is not None and self.clock() - self.started >= self.max_seconds

    def local_votes(self) -> list[float]:
        votes = [1.0 if self.received == name else 0.0 for name in SIGNALS]
        return [*votes, 1.0 if self.is_main and self.over_budget() else 0.0]

    def poll(self, comm) -> str | None:
        """The reason to stop that ranks agree on, or None. Collective: every rank calls it each step."""
        votes = torch.tensor(self.local_votes(), dtype=torch.float64, device=comm.device)
        return agreed_reason(comm.reduce_sum(votes))


def agreed_reason(votes: torch.Tensor) -> str | None:
    """The first reason with a vote on any rank (signals before the time budget)."""
    for name, count in zip(REASONS, votes.tolist()):
        if count > 0:
            return name
    return None


# ---------------------------------------------------------------------------- restarts.json


def _read(output_dir: str) -> dict:
    try:
        with open(os.path.join(output_dir, RESTARTS_FILE), encoding="utf-8") as handle:
            record = json.load(handle)
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def check_restart(output_dir: str, start_step: int, limit: int) -> int:
    """How many starts in a row (this one included) began at `start_step` before this one; refuses
    past `limit`. Read-only: `record_start` writes the count once output_dir may be touched."""
    record = _read(output_dir)
    ended = record.get("ended") or {}
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        # torchrun restarts a group whose ranks exited non-zero, 3 included: a stop it was asked
        # for (a signal, the time budget) stays a stop instead of training on.
        if ended.get("reason") != FINISHED and ended.get("torchelastic_run_id") == run_id:
            raise StoppedEarly(
                f"torchrun restarted this job after it stopped early at step {ended.get('step')} "
                f"({ended.get('reason')}); not training on (resume=auto continues in a new job)"
            )
    # A start that ended by itself (finished, or stopped on request) was no failed attempt.
    failed_before = record.get("start_step") == start_step and not ended
    count = int(record.get("count", 0)) + 1 if failed_before else 0
    if count > limit:
        raise ConfigError(
            f"trainer.max_restarts_without_progress: {count} restarts in a row began at step {start_step} "
            f"without a newer checkpoint (limit {limit}); stopped instead of looping -- see train.log in "
            f"{output_dir} for why each attempt ended (delete {RESTARTS_FILE} there to try again)"
        )
    return count


def record_start(output_dir: str, start_step: int, count: int) -> None:
    """Rank 0: this start's step and count (no stop recorded yet)."""
    atomic_write_text(
        os.path.join(output_dir, RESTARTS_FILE),
        json.dumps({"start_step": start_step, "count": count, "started": time.time()}) + "\n",
    )


def record_end(output_dir: str, reason: str, step: int) -> None:
    """Rank 0: how this run ended by itself (`FINISHED`, or why it stopped early) and at which step;
    a torchrun restart of the same job reads it, and the next start does not count as a retry."""
    record = _read(output_dir)
    record["ended"] = {"reason": reason, "step": step, "torchelastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID")}
    atomic_write_text(os.path.join(output_dir, RESTARTS_FILE), json.dumps(record) + "\n")
