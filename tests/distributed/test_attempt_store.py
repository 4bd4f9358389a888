"""The rendezvous store a torchrun attempt joins: keys the killed group left in the agent's store
(which outlives a restart) must be invisible to the restarted group, or its ranks read a dead
peer's gloo address. In-process: a TCPStore stands in for the agent's."""

from __future__ import annotations

import datetime

import pytest
import torch.distributed as dist

from persimmon_train.parallel.distributed import attempt_store

TIMEOUT = datetime.timedelta(seconds=10)


@pytest.fixture
def agent_store(monkeypatch):
    server = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    return server


def test_a_restarted_attempt_does_not_see_the_keys_of_the_killed_one(agent_store, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = attempt_store(TIMEOUT)
    first.set("rank_1", "127.0.0.1:5041")  # what gloo publishes for a peer
    assert first.check(["rank_1"])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = attempt_store(TIMEOUT)
    assert not second.check(["rank_1"])
    second.set("rank_1", "127.0.0.1:6000")
    assert first.get("rank_1") == b"127.0.0.1:5041" and second.get("rank_1") == b"127.0.0.1:6000"
    # Both live in the agent's one store, under the attempt's name.
    assert agent_store.get("persimmon_train/attempt_1/rank_1") == b"127.0.0.1:6000"


def test_launchers_that_make_a_new_store_per_launch_use_env_rendezvous(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert attempt_store(TIMEOUT) is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert attempt_store(TIMEOUT) is None
