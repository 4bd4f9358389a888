"""PersimmonConfig: defaults, reading 4.x / 5.x config.json, validation naming the key, 8B on meta."""

import json

import pytest
import torch

from persimmon_train.errors import ConfigError
from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM


def test_defaults_are_the_released_8b():
    c = PersimmonConfig()
    assert (
        c.vocab_size,
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.max_position_embeddings,
        c.rope_theta,
        c.partial_rotary_factor,
        c.qk_layernorm,
        c.hidden_act,
        c.layer_norm_eps,
        c.bos_token_id,
        c.eos_token_id,
    ) == (262144, 4096, 16384, 36, 64, 16384, 25000.0, 0.5, True, "relu2", 1e-5, 1, 2)


def test_8b_builds_on_meta_and_reports_parameter_count():
    """Counted against an independent oracle: transformers' PersimmonForCausalLM built on meta from
    the same config, tensor by tensor (name and shape), and in total."""
    transformers = pytest.importorskip("transformers")
    config = PersimmonConfig()
    with torch.device("meta"):
        model = PersimmonForCausalLM(config)
        oracle = transformers.PersimmonForCausalLM(transformers.PersimmonConfig.from_dict(config.to_dict()))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {name: tuple(p.shape) for name, p in oracle.named_parameters()}
    n = model.num_parameters()
    assert n == config.num_parameters() == sum(p.numel() for p in oracle.parameters())
    assert 9.0e9 < n < 9.5e9  # 8B body + untied 262144 x 4096 embeddings and head: ~9.4B (published: 9.4B)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert len(model.model.layers) == 36


def test_reads_transformers_4x_config(tmp_path):
    raw = {
        "model_type": "persimmon",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rope_theta": 25000.0,
        "partial_rotary_factor": 0.5,
        "rope_scaling": {"type": "linear", "factor": 4.0},
        "bos_token_id": 71013,
        "eos_token_id": 71013,
        "hidden_dropout": 0.6,
        "transformers_version": "4.34.0",
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = PersimmonConfig.from_json_file(tmp_path)
    assert c.rope_scaling == {"type": "linear", "factor": 4.0}
    assert (c.bos_token_id, c.eos_token_id, c.hidden_dropout) == (71013, 71013, 0.6)


def test_reads_transformers_5x_config():
    raw = {
        "model_type": "persimmon",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 999.0, "partial_rotary_factor": 0.25},
    }
    c = PersimmonConfig.from_dict(raw)
    assert (c.rope_theta, c.partial_rotary_factor, c.rope_scaling) == (999.0, 0.25, None)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(hidden_size=100, num_attention_heads=3), "num_attention_heads"),
        (dict(hidden_act="swish"), "hidden_act"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling.type"),
        (dict(rope_scaling={"type": "linear", "factor": 1.0}), "rope_scaling.factor"),
        (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(hidden_dropout=1.5), "hidden_dropout"),
        (dict(problem_type="ranking"), "problem_type"),
    ],
)
def test_validation_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        PersimmonConfig(**overrides)


def test_bad_config_file_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        PersimmonConfig.from_json_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type"):
        PersimmonConfig.from_json_file(tmp_path)
    with pytest.raises(ConfigError, match="no such config"):
        PersimmonConfig.from_json_file(tmp_path / "missing")
