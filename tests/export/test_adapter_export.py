"""merge=false: the LoRA adapter alone, in PEFT's format, loaded by peft on transformers' Persimmon."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from persimmon_train.errors import ConfigError
from persimmon_train.export import export_checkpoint
from tests.export.conftest import checkpoint_of

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture
def cache_env(monkeypatch, export_env):
    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", export_env["PERSIMMON_TRAIN_CACHE"])


def _exports(run, tmp_path):
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    result = export_checkpoint(str(checkpoint_of(run)), str(adapter), dtype="fp32", merge=False)
    assert result.kind == "adapter"
    export_checkpoint(str(checkpoint_of(run)), str(merged), dtype="fp32")
    return adapter, merged


def test_causal_lm_adapter_in_peft_gives_the_merged_logits(lora_run, base_dir, tmp_path, cache_env):
    adapter, merged = _exports(lora_run, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["peft_type"]) == (8, 16, True, "LORA")

    # Same names and values peft itself saved from the live model at the same step (run/adapter).
    ours = load_file(str(adapter / "adapter_model.safetensors"))
    peft_saved = load_file(str(lora_run / "adapter" / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(peft_saved)
    assert "base_model.model.model.layers.0.self_attn.query_key_value.lora_A.weight" in ours
    for name, tensor in peft_saved.items():
        assert torch.equal(ours[name], tensor), name

    base = transformers.PersimmonForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.randint(3, base.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = with_adapter(input_ids=ids).logits, merged_model(input_ids=ids).logits
        plain_model = transformers.PersimmonForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        plain = plain_model(input_ids=ids).logits
    assert (a - plain).abs().max() > 1e-3  # the adapter really changes the model
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_classifier_adapter_carries_its_head(classify_run, base_dir, tmp_path, cache_env):
    adapter, merged = _exports(classify_run, tmp_path)
    ours = load_file(str(adapter / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in ours

    base = transformers.PersimmonForSequenceClassification.from_pretrained(base_dir, num_labels=2, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    merged_model = transformers.AutoModelForSequenceClassification.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(
            with_adapter(input_ids=ids, attention_mask=mask).logits,
            merged_model(input_ids=ids, attention_mask=mask).logits,
            atol=1e-5,
            rtol=1e-4,
        )


def test_full_finetune_has_no_adapter(full_run, tmp_path, cache_env):
    with pytest.raises(ConfigError, match="merge=false.*full fine-tuning"):
        export_checkpoint(str(checkpoint_of(full_run)), str(tmp_path / "a"), merge=False)
    assert not (tmp_path / "a").exists()
