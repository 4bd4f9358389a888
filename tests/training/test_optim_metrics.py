"""AdamW parameter groups, LR schedules, and the eval metrics."""

from __future__ import annotations

import pytest
import torch

from persimmon_train.training.config import OptimConfig
from persimmon_train.training.metrics import accuracy, entities, entity_f1, macro_f1
from persimmon_train.training.optim import build_scheduler, lr_multiplier, parameter_groups
from tests.helpers import tiny_model


def test_no_weight_decay_on_norms_and_biases():
    model = tiny_model()
    decayed, plain = parameter_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    plain_names = {names[id(p)] for p in plain["params"]}
    assert all(n.endswith("bias") or "layernorm" in n for n in plain_names)
    assert "model.final_layernorm.weight" in plain_names and "model.layers.0.mlp.dense_h_to_4h.bias" in plain_names
    assert {names[id(p)] for p in decayed["params"]} >= {"lm_head.weight", "model.embed_tokens.weight"}


def test_frozen_parameters_are_left_out():
    model = tiny_model()
    model.lm_head.weight.requires_grad_(False)
    groups = parameter_groups(model, 0.0)
    assert all(p is not model.lm_head.weight for g in groups for p in g["params"])


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warmup_then_decay_to_min(schedule):
    f = [lr_multiplier(s, max_steps=100, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[100] == pytest.approx(0.1)
    assert f[55] == pytest.approx(0.55, abs=1e-9)  # both are at the midpoint halfway between 1 and 0.1
    # ... and differ everywhere else: at 1/3 of the decay (step 40) cosine is at 0.1 + 0.9 * 3/4,
    # linear at 0.1 + 0.9 * 2/3; at 2/3 (step 70) cosine 0.1 + 0.9 / 4, linear 0.1 + 0.9 / 3.
    third, two_thirds = {"cosine": (0.775, 0.325), "linear": (0.7, 0.4)}[schedule]
    assert f[40] == pytest.approx(third, abs=1e-9) and f[70] == pytest.approx(two_thirds, abs=1e-9)


# max_steps 90, warmup 10: decay progress 0.25 / 0.5 / 0.75 at steps 30 / 50 / 70. By hand, with
# min_lr_ratio 0.1: cosine = 0.1 + 0.9 * (1 + cos(pi * p)) / 2, linear = 0.1 + 0.9 * (1 - p).
DECAY_POINTS = {
    "cosine": {30: 0.1 + 0.9 * (2 + 2**0.5) / 4, 50: 0.55, 70: 0.1 + 0.9 * (2 - 2**0.5) / 4},
    "linear": {30: 0.775, 50: 0.55, 70: 0.325},
}


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules_where_cosine_and_linear_differ(schedule):
    points = DECAY_POINTS[schedule]
    for step, want in points.items():
        assert lr_multiplier(step, max_steps=90, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1) == pytest.approx(
            want, abs=1e-12
        ), step
    # The scheduler the trainer steps follows the configured schedule (not a default one).
    cfg = OptimConfig(lr=2.0, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, max_steps=90)
    seen = {}
    for step in range(91):
        seen[step] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
    assert seen[9] == pytest.approx(2.0) and seen[90] == pytest.approx(0.2)
    for step, want in points.items():
        assert seen[step] == pytest.approx(2.0 * want, abs=1e-9), step


def test_constant_schedule():
    assert lr_multiplier(50, max_steps=100, warmup_steps=0, schedule="constant", min_lr_ratio=0.0) == 1.0


def test_classification_metrics():
    assert accuracy([0, 1, 1, 2], [0, 1, 0, 2]) == 0.75
    # class 0: p=1 r=.5 f=2/3; class 1: p=.5 r=1 f=2/3; class 2: f=1
    assert macro_f1([0, 1, 1, 2], [0, 1, 0, 2]) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_entity_spans_and_f1():
    assert entities(["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-ORG"]) == {
        ("PER", 0, 2),
        ("LOC", 3, 4),
        ("LOC", 4, 5),
        ("ORG", 5, 6),
    }
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert entity_f1(gold, gold)["entity_f1"] == 1.0
    # A truncated span is wrong as a whole (entity-level, not token-level).
    half = entity_f1([["B-PER", "O", "O", "B-LOC"]], gold)
    assert half["entity_precision"] == 0.5 and half["entity_recall"] == 0.5
    assert entity_f1([["O"] * 4], gold)["entity_f1"] == 0.0
