"""Every kind of checkpoint exports to the weights training produced, and the export loads in
transformers with our logits.

Independent checks: a full fine-tune's export equals the checkpoint's own model.safetensors read by
the safetensors library; every export loads in transformers (logits equal ours); LoRA exports are
checked against peft's own merge in test_adapter_export.py."""

from __future__ import annotations

import json

import pytest
import torch

from persimmon_train.export import export_checkpoint
from tests.export.conftest import checkpoint_of
from tests.helpers import load_tensors

RUNS = ["full_run", "lora_run", "lora_random_run", "classify_run"]


@pytest.fixture
def cache_env(monkeypatch, export_env):
    # In-process exports rebuild data / demo assets from the same cache the recipe runs used.
    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", export_env["PERSIMMON_TRAIN_CACHE"])


def _logits_match_transformers(folder, architecture: str) -> None:
    transformers = pytest.importorskip("transformers")
    import persimmon_train.model as ours_models

    ours = getattr(ours_models, architecture).from_pretrained(folder).eval()
    auto = {
        "PersimmonForCausalLM": transformers.AutoModelForCausalLM,
        "PersimmonForSequenceClassification": transformers.AutoModelForSequenceClassification,
        "PersimmonForTokenClassification": transformers.AutoModelForTokenClassification,
    }[architecture]
    theirs = auto.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(theirs).__name__ == architecture
    ids = torch.randint(3, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, attention_mask=mask).logits,
            theirs(input_ids=ids, attention_mask=mask).logits,
            atol=1e-5,
            rtol=1e-4,
        )


@pytest.mark.parametrize("run_name", RUNS)
def test_export_reproduces_final_and_loads_in_transformers(run_name, request, tmp_path, cache_env):
    run = request.getfixturevalue(run_name)
    out = tmp_path / "export"
    result = export_checkpoint(str(checkpoint_of(run)), str(out), dtype="fp32", max_shard_size="150KB")

    # Sharded like transformers: numbered files + an index naming every tensor's file.
    assert len(result.files) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(result.files)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file(), name

    # The same weights (bit for bit) and config as the run's own final/ (same checkpoint, same code) ...
    exported, final = load_tensors(out), load_tensors(run / "final")
    assert sorted(exported) == sorted(final)
    for name, tensor in final.items():
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name], tensor), name
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in final.values())
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((run / "final" / "config.json").read_text())
    architecture = config["architectures"][0]
    if architecture == "PersimmonForCausalLM":
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == config["eos_token_id"]
    else:
        assert set(config["id2label"].values()) == {"neg", "pos"} and config["label2id"]["pos"] in (0, 1)
    _logits_match_transformers(out, architecture)


def test_full_export_is_the_checkpoint_read_by_safetensors(full_run, tmp_path):
    """... and, for full fine-tuning, exactly the trained tensors as the safetensors library reads them."""
    from safetensors.torch import load_file

    out = tmp_path / "full"
    export_checkpoint(str(checkpoint_of(full_run)), str(out), dtype="fp32")
    trained = load_file(str(checkpoint_of(full_run) / "model.safetensors"))
    exported = load_tensors(out)
    assert sorted(exported) == sorted(trained)
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name


def test_bf16_export_casts_every_weight(lora_run, tmp_path, cache_env):
    out = tmp_path / "bf16"
    result = export_checkpoint(str(lora_run), str(out))  # a run folder: its newest checkpoint; bf16 default
    assert result.files == ["model.safetensors"] and result.checkpoint == str(checkpoint_of(lora_run))
    exported, final = load_tensors(out), load_tensors(lora_run / "final")
    for name, tensor in final.items():
        assert exported[name].dtype == torch.bfloat16
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name


def test_export_never_deletes_a_file_it_did_not_write(lora_run, tmp_path, cache_env):
    from persimmon_train.errors import ConfigError

    out = tmp_path / "again"
    export_checkpoint(str(checkpoint_of(lora_run)), str(out), dtype="fp32", max_shard_size="150KB")
    (out / "notes.txt").write_text("keep me")
    (out / "config.json").write_text("{}")  # looks like an earlier export: still not ours to replace unasked
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match=f"output_dir: {out} exists and is not empty"):
        export_checkpoint(str(checkpoint_of(lora_run)), str(out), dtype="fp32")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused: nothing changed

    export_checkpoint(str(checkpoint_of(lora_run)), str(out), dtype="fp32", overwrite=True)  # now one file
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]  # stale shards gone
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "notes.txt").read_text() == "keep me"  # the user's file survives
    assert json.loads((out / "config.json").read_text())["architectures"] == ["PersimmonForCausalLM"]
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]  # no leftovers beside it


def test_classifier_export_reads_no_data(classify_run, tmp_path, monkeypatch):
    """Label names come from the checkpoint's manifest: export works after the data files are gone."""
    import persimmon_train.data as data

    def no_data(*args, **kwargs):
        raise AssertionError("export read the run's data files")

    monkeypatch.setattr(data, "build_data", no_data)
    out = tmp_path / "cls"
    export_checkpoint(str(checkpoint_of(classify_run)), str(out), dtype="fp32")
    config = json.loads((out / "config.json").read_text())
    assert set(config["id2label"].values()) == {"neg", "pos"}
    assert config == json.loads((classify_run / "final" / "config.json").read_text())
