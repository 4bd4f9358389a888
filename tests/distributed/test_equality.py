"""Same global batch, fp32, AC on, 10 steps: single vs 2-rank FSDP2 vs ZeRO-2 vs ZeRO-3 agree at every step."""

from __future__ import annotations

import pytest

from tests.helpers import STEPS, train_losses

TOLERANCE = 1e-4

pytestmark = pytest.mark.slow


def _assert_same_losses(reference, other):
    ref, got = train_losses(reference), train_losses(other)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(ref[s] - got[s]) for s in ref)
    assert worst <= TOLERANCE, f"{other.name}: max |loss - single| = {worst:.2e} ({got} vs {ref})"
    assert ref[STEPS] < ref[1]  # it trained


@pytest.mark.parametrize("name", ["fsdp", "zero2", "zero3"])
def test_full_finetune_matches_single(runs, name):
    _assert_same_losses(runs.get("single"), runs.get(name))


@pytest.mark.parametrize("name", ["fsdp_lora", "zero2_lora", "zero3_lora"])
def test_lora_matches_single(runs, name):
    _assert_same_losses(runs.get("single_lora"), runs.get(name))


def test_only_rank0_writes_metrics_and_exports(runs):
    out = runs.get("fsdp")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"loss"' in line]) == STEPS  # not 2 x STEPS
    assert (out / "final" / "model.safetensors").exists()
