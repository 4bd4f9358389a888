"""HF folders in and out: ours -> transformers and transformers -> ours, single file and sharded."""

import json
import os

import pytest
import torch

from persimmon_train.errors import WeightsError
from persimmon_train.model import (
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonForTokenClassification,
)
from tests.helpers import parity_config, twins

transformers = pytest.importorskip("transformers")
IDS = torch.randint(1, 160, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("max_shard_size", ["5GB", "40KB"])
def test_ours_to_transformers(tmp_path, max_shard_size):
    ours, _ = twins(parity_config())
    ours.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    sharded = os.path.exists(tmp_path / "model.safetensors.index.json")
    assert sharded == (max_shard_size == "40KB")
    if sharded:
        assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) == len(
            ours.state_dict()
        )
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "PersimmonForCausalLM"
    with torch.no_grad():
        assert (ours(IDS).logits - hf(IDS).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("max_shard_size", ["5GB", "40KB"])
def test_transformers_to_ours(tmp_path, max_shard_size):
    _, hf = twins(parity_config(), seed=3)
    hf.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    ours = PersimmonForCausalLM.from_pretrained(tmp_path).eval()
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in ours.parameters())
    with torch.no_grad():
        assert (ours(IDS).logits - hf(IDS).logits).abs().max().item() <= 1e-5
    bf16 = PersimmonForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


@pytest.mark.parametrize(
    "cls, auto",
    [
        (PersimmonForSequenceClassification, "AutoModelForSequenceClassification"),
        (PersimmonForTokenClassification, "AutoModelForTokenClassification"),
    ],
)
def test_heads_round_trip_with_labels(tmp_path, cls, auto):
    config = parity_config(id2label={0: "neg", 1: "neu", 2: "pos"})
    head = "sequence_classification" if cls is PersimmonForSequenceClassification else "token_classification"
    ours, _ = twins(config, head=head)
    ours.save_pretrained(tmp_path)
    hf = getattr(transformers, auto).from_pretrained(tmp_path).eval()
    assert hf.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    back = cls.from_pretrained(tmp_path).eval()
    assert back.config.label2id == {"neg": 0, "neu": 1, "pos": 2}
    with torch.no_grad():
        assert (ours(IDS).logits - hf(IDS).logits).abs().max().item() <= 1e-5
        assert torch.equal(ours(IDS).logits, back(IDS).logits)


def test_classifier_from_causal_lm_checkpoint_gets_fresh_head(tmp_path):
    ours, _ = twins(parity_config())
    ours.save_pretrained(tmp_path)
    clf = PersimmonForSequenceClassification.from_pretrained(tmp_path, num_labels=4)
    assert clf.score.weight.shape == (4, 64) and clf.score.weight.device.type == "cpu"
    assert torch.equal(clf.model.embed_tokens.weight, ours.model.embed_tokens.weight)


def test_causal_lm_from_classifier_checkpoint_is_refused(tmp_path):
    clf, _ = twins(parity_config(), head="sequence_classification")
    clf.save_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="lm_head.weight"):
        PersimmonForCausalLM.from_pretrained(tmp_path)


def test_from_pretrained_errors_name_file_and_tensor(tmp_path):
    ours, _ = twins(parity_config())
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError) as e:
        PersimmonForCausalLM.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "dense_h_to_4h" in msg and "model.safetensors" in msg and "128" in msg and "96" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tmp_path / "config.json").read_text())
    with pytest.raises(WeightsError, match="empty"):
        PersimmonForCausalLM.from_pretrained(empty)
