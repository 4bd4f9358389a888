"""Activation checkpointing keeps names and gradients; LoRA merge equals peft's; strategy state."""

from __future__ import annotations

import torch

from persimmon_train.parallel import SingleDeviceStrategy
from persimmon_train.parallel.activation_checkpointing import apply_activation_checkpointing
from persimmon_train.training.config import OptimConfig, PeftConfig
from persimmon_train.training.optim import build_optimizer
from tests.helpers import causal_rows, tiny_model


def _grads(model):
    rows = causal_rows(2)
    ids = torch.stack([r["input_ids"] for r in rows])
    labels = torch.stack([r["labels"] for r in rows])
    model(ids, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_names_and_gradients():
    plain = tiny_model(num_hidden_layers=4)
    checkpointed = tiny_model(num_hidden_layers=4)
    assert apply_activation_checkpointing(checkpointed, 2) == [0, 2]
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    reference, got = _grads(plain), _grads(checkpointed)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], atol=1e-6, rtol=1e-5)
    assert apply_activation_checkpointing(tiny_model(), 0) == []


def test_lora_merge_matches_peft():
    """Export's streaming merge (base tensors + the trainable LoRA tensors) equals peft's merge_and_unload."""
    from persimmon_train.adapters import apply_lora
    from persimmon_train.export.merge import iter_merged_lora, split_lora

    cfg = PeftConfig(method="lora", r=4, alpha=8.0, dropout=0.0)
    peft_model = apply_lora(tiny_model(), cfg, "causal_lm")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # B starts at zero; make the adapter do something
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lora = split_lora(((n, p.detach()) for n, p in peft_model.named_parameters() if p.requires_grad), "test")
    base = tiny_model().state_dict()  # what peft wrapped: the same seeded model
    merged = dict(iter_merged_lora(base.items(), lora, cfg, set(base), "test"))
    plain = tiny_model(seed=5)
    plain.load_state_dict(merged)  # strict: plain HF names only
    ids = torch.randint(1, 64, (2, 12))
    with torch.no_grad():
        expected = peft_model(ids).logits
        torch.testing.assert_close(plain(ids).logits, expected, atol=1e-5, rtol=1e-5)
        reference = peft_model.merge_and_unload().state_dict()
    for name, value in merged.items():
        torch.testing.assert_close(value, reference[name], atol=1e-6, rtol=1e-6)


def test_single_strategy_state_round_trip(tmp_path):
    opt_cfg = OptimConfig()
    a = SingleDeviceStrategy("fp32", "cpu")
    model_a, opt_a = a.wrap(tiny_model(seed=1), lambda m: build_optimizer(m, opt_cfg))
    _grads(model_a)
    a.optimizer_step()
    a.save_state(str(tmp_path))
    b = SingleDeviceStrategy("fp32", "cpu")
    model_b, opt_b = b.wrap(tiny_model(seed=2), lambda m: build_optimizer(m, opt_cfg))
    b.load_state(str(tmp_path))
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), name
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert all(torch.equal(state_a[k]["exp_avg"], state_b[k]["exp_avg"]) for k in state_a)
