"""The sharded load's plan (parallel/sharded_load.py) checks every tensor's FULL shape against the
model before anything is read. Every rank builds the same plan from the file headers and the model's
global shapes (a DTensor's .shape is the global one), so a head with another num_labels is refused
on every rank instead of each rank reading some rows of a tensor of another shape."""

from __future__ import annotations

import pytest
import torch

from persimmon_train.errors import WeightsError
from persimmon_train.model import PersimmonForSequenceClassification
from persimmon_train.parallel.sharded_load import LoadPlan
from tests.helpers import demo_tokenizer, tiny_config


def _classifier(num_labels: int, seed: int = 0):
    config = tiny_config(demo_tokenizer(), hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    config.num_labels = num_labels
    torch.manual_seed(seed)
    return PersimmonForSequenceClassification.from_config(config)


def _plan(model, folder):
    cls = type(model)
    return LoadPlan(model, str(folder), fresh_prefixes=cls.head_prefixes, ignore=cls.foreign_head_keys)


def test_a_head_of_another_num_labels_is_refused(tmp_path):
    _classifier(num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(
        WeightsError, match=r"tensor score\.weight in .* has shape \[3, 32\] but the model expects \[5, 32\]"
    ):
        _plan(_classifier(num_labels=5), tmp_path)


def test_the_same_shapes_load_every_tensor(tmp_path):
    saved = _classifier(num_labels=3, seed=1)
    saved.save_pretrained(tmp_path)
    model = _classifier(num_labels=3, seed=2)
    plan = _plan(model, tmp_path)
    assert "score.weight" in plan.source and not plan.fresh
    plan.fill(dict(model.named_parameters()), torch.Generator().manual_seed(0), 0.02)
    for (name, got), (_, want) in zip(model.named_parameters(), saved.named_parameters()):
        assert torch.equal(got, want), name
