"""parallel/zero_reshard.py refuses a checkpoint that does not fit the engine, in one line, before
anything is written into it (the resharding itself: tests/distributed/test_checkpoints.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from persimmon_train.errors import CheckpointError
from persimmon_train.parallel.zero_reshard import _check_matches


def _checkpoint(**shapes):
    return SimpleNamespace(
        names=list(shapes),
        shapes={k: torch.Size(v) for k, v in shapes.items()},
        aliases={},
        param_groups=lambda: [{"lr": 1e-3}, {"lr": 1e-3}],
    )


TRAINABLE = {"a.weight": torch.zeros(4, 2), "b.bias": torch.zeros(4)}
GROUPS = [{}, {}]


def test_a_fitting_checkpoint_passes():
    _check_matches(_checkpoint(**{"a.weight": (4, 2), "b.bias": (4,)}), TRAINABLE, GROUPS, 2, "ckpt")


@pytest.mark.parametrize(
    "shapes,groups,message",
    [
        ({"a.weight": (4, 2)}, GROUPS, "the checkpoint has no b.bias"),
        ({"a.weight": (4, 2), "b.bias": (4,), "c.w": (1,)}, GROUPS, "has c.w, which this run does not train"),
        ({"a.weight": (2, 4), "b.bias": (4,)}, GROUPS, r"a.weight is \(2, 4\) in the checkpoint, \(4, 2\) in this run"),
        ({"a.weight": (4, 2), "b.bias": (4,)}, [{}], "2 optimizer parameter groups, this run has 1"),
    ],
)
def test_a_mismatch_is_named(shapes, groups, message):
    with pytest.raises(CheckpointError, match=message):
        _check_matches(_checkpoint(**shapes), TRAINABLE, groups, 2, "ckpt")
