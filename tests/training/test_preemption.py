"""Stop requests: what a signal handler records, how ranks agree, the time budget, restarts.json."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from persimmon_train import cli
from persimmon_train.errors import ConfigError, StoppedEarly
from persimmon_train.training import preemption
from persimmon_train.training.preemption import StopFlag, agreed_reason


class Ranks:
    """reduce_sum over several simulated ranks' votes (what the all-reduce computes)."""

    device = torch.device("cpu")

    def __init__(self, *flags):
        self.flags = flags

    def reduce_sum(self, _mine):
        return torch.stack([torch.tensor(f.local_votes(), dtype=torch.float64) for f in self.flags]).sum(0)


def test_handler_only_records_and_restore_puts_back_the_previous_handlers():
    before = {s: signal.getsignal(getattr(signal, s)) for s in preemption.SIGNALS}
    flag = StopFlag().install()
    try:
        assert flag.received is None
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered at the next bytecode: the process lives on
        assert flag.received == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.received == "SIGUSR1"  # the first signal is the one named
    finally:
        flag.restore()
    assert {s: signal.getsignal(getattr(signal, s)) for s in preemption.SIGNALS} == before


def test_first_sigint_requests_a_stop_the_second_stops_at_once():
    flag = StopFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.restore()


def test_one_signalled_rank_stops_every_rank():
    quiet, signalled = StopFlag(is_main=True), StopFlag(is_main=False)
    comm = Ranks(quiet, signalled)
    assert quiet.poll(comm) is None
    signalled.received = "SIGTERM"
    assert quiet.poll(comm) == signalled.poll(comm) == "SIGTERM"
    assert agreed_reason(torch.tensor([0.0, 2.0, 0.0, 1.0])) == "SIGUSR1"  # a signal is named before the budget


def test_time_budget_is_rank_0s_clock():
    now = [0.0]
    main = StopFlag(max_minutes=1, is_main=True, clock=lambda: now[0])
    other = StopFlag(max_minutes=1, is_main=False, clock=lambda: now[0])
    other.started -= 1000  # this rank's clock says the budget is long spent: it does not vote
    comm = Ranks(main, other)
    now[0] = 59.0
    assert main.poll(comm) is None and other.poll(comm) is None
    now[0] = 60.0
    assert main.poll(comm) == other.poll(comm) == "trainer.max_minutes"
    assert StopFlag(max_minutes=None, clock=lambda: 1e9).poll(Ranks(StopFlag())) is None


def test_exit_code_tells_stopped_early_apart(capsys):
    def stops(cfg):
        raise StoppedEarly("stopped early (SIGTERM) at step 3: /x/checkpoints/step_3")

    with pytest.raises(SystemExit) as exit_info:
        cli.run_recipe("finetune", stops, ["trainer.max_steps=5"])
    assert exit_info.value.code == cli.EXIT_STOPPED_EARLY == 3
    assert len({0, 1, cli.EXIT_USER_ERROR, cli.EXIT_STOPPED_EARLY}) == 4
    assert "SIGTERM" in capsys.readouterr().err


def test_restarts_without_progress_are_counted_then_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    out = str(tmp_path)
    assert preemption.check_restart(out, 0, limit=2) == 0  # no file: a first start
    for expected in (0, 1, 2):
        count = preemption.check_restart(out, 4, limit=2)
        assert count == expected
        preemption.record_start(out, 4, count)
    with pytest.raises(ConfigError, match="3 restarts in a row began at step 4"):
        preemption.check_restart(out, 4, limit=2)
    assert preemption.check_restart(out, 6, limit=2) == 0  # a newer checkpoint: progress resets the count
    preemption.record_end(out, preemption.FINISHED, 4)  # an attempt that ended by itself is no failure
    assert preemption.check_restart(out, 4, limit=2) == 0


def test_torchrun_restart_after_a_requested_stop_stays_stopped(tmp_path, monkeypatch):
    out = str(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    preemption.record_start(out, 0, preemption.check_restart(out, 0, limit=3))
    preemption.record_end(out, "SIGTERM", 5)
    assert json.loads((tmp_path / preemption.RESTARTS_FILE).read_text())["ended"]["step"] == 5
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(StoppedEarly, match="stopped early at step 5"):
        preemption.check_restart(out, 5, limit=3)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")  # a new job (requeued): continues
    assert preemption.check_restart(out, 5, limit=3) == 0
