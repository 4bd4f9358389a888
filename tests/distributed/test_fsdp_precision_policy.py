"""FSDP2 under bf16 computes in bf16 but reduces gradients in float32 onto float32 master shards:
the MixedPrecisionPolicy every fully_shard unit gets (parallel/fsdp.py `parallelize`), read back
from the modules in a one-rank gloo group in this process."""

from __future__ import annotations

import pytest
import torch

from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM
from persimmon_train.parallel.fsdp import FSDPStrategy


def _policies(precision: str, monkeypatch):
    from torch.distributed.fsdp import FSDPModule

    for name in ("MASTER_ADDR", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)  # a one-rank group on an in-process store
    config = PersimmonConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    strategy = FSDPStrategy(precision=precision, device="cpu", backend="gloo")
    try:
        model = strategy.parallelize(PersimmonForCausalLM.from_config(config))
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        policies = [unit._get_fsdp_state()._fsdp_param_group.mp_policy for unit in units]
        master = {p.dtype for p in model.parameters()}
    finally:
        strategy.close()
    assert len(units) == config.num_hidden_layers + 1  # each decoder layer and the root
    return policies, master


def test_bf16_reduces_gradients_in_float32(monkeypatch):
    policies, master = _policies("bf16", monkeypatch)
    for policy in policies:
        assert policy.param_dtype == torch.bfloat16
        assert policy.reduce_dtype == torch.float32
    assert master == {torch.float32}


@pytest.mark.parametrize("precision", ["fp32"])
def test_fp32_keeps_everything_in_float32(precision, monkeypatch):
    policies, master = _policies(precision, monkeypatch)
    for policy in policies:
        assert policy.param_dtype in (None, torch.float32) and policy.reduce_dtype in (None, torch.float32)
    assert master == {torch.float32}
