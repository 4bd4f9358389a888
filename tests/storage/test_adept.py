"""Conversion of ADEPT's Megatron-style release, on a tiny synthetic checkpoint laid out like it.

The synthetic file copies the release's structure from adept-inference (megatron/checkpointing.py,
megatron/model/{gpt_model,language_model,transformer,positional_embeddings}.py): top-level
``args`` / ``iteration`` / ``checkpoint_version`` / ``rng_state`` / ``model``; ``model`` nested as
``language_model.embedding.word_embeddings.weight``, ``language_model.encoder`` (a flat dict of
``layers.N....`` names including the ``rotary_emb.inv_freq`` buffer, and ``final_layernorm``),
``word_embeddings_for_head.weight``; ``args.model_type`` a ``megatron.model.enums.ModelType``.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import random
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from persimmon_train.errors import ConfigError, WeightsError
from persimmon_train.export.adept import convert_adept_checkpoint, find_checkpoint_file
from persimmon_train.model import PersimmonForCausalLM
from persimmon_train.storage import iter_weights_folder
from tests.helpers import REPO, assert_one_line_error, run_in_process

ITERATION = 1251
HIDDEN, HEADS, FFN, LAYERS = 64, 4, 256, 2
PADDED_VOCAB = 384  # the sentencepiece model has ~300 pieces; Megatron pads to a multiple of 128
ROTARY_BASE, ROTARY_PCT, EPS = 12345, 0.25, 1e-6  # deliberately not any class default


# --------------------------------------------------------------------------- fixtures


def _train_sentencepiece(folder: Path, name: str, user_symbols: list[str]) -> Path:
    import sentencepiece as spm

    rng = random.Random(0)
    words = [
        "persimmon",
        "adept",
        "human",
        "model",
        "train",
        "weights",
        "token",
        "layer",
        "rotary",
        "megatron",
        "fruit",
        "orange",
        "sweet",
        "tree",
        "autumn",
        "checkpoint",
        "convert",
    ]
    corpus = folder / f"{name}.txt"
    corpus.write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(12)) + " |ENDOFTEXT|" for _ in range(400)) + "\n"
    )
    prefix = folder / name
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=300,
        model_type="unigram",
        user_defined_symbols=user_symbols,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def adept_vocab(tmp_path_factory) -> Path:
    return _train_sentencepiece(tmp_path_factory.mktemp("vocab"), "adept_vocab", ["|ENDOFTEXT|"])


class _ModelType(enum.Enum):
    encoder_or_decoder = 1
    encoder_and_decoder = 2


# A stand-in `megatron.model.enums` module: installed in sys.modules only while saving, so the
# args pickle exactly as in the release (by reference) and the loader cannot import it.
_ModelType.__module__, _ModelType.__qualname__ = "megatron.model.enums", "ModelType"
_MEGATRON_ENUMS = types.ModuleType("megatron.model.enums")
_MEGATRON_ENUMS.ModelType = _ModelType


def megatron_args(**overrides) -> argparse.Namespace:
    """The architecture-relevant part of a Megatron args namespace, plus typical noise."""
    values = dict(
        num_layers=LAYERS,
        encoder_num_layers=LAYERS,
        decoder_num_layers=LAYERS,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        kv_channels=HIDDEN // HEADS,
        seq_length=64,
        encoder_seq_length=64,
        max_position_embeddings=64,
        pos_emb="rotary",
        rotary_pct=ROTARY_PCT,
        rotary_emb_base=ROTARY_BASE,
        qk_layernorm="weights_per_layer",
        untie_embeddings=True,
        sq_relu=True,
        openai_gelu=False,
        onnx_safe=None,
        layernorm_epsilon=EPS,
        apply_residual_connection_post_layernorm=False,
        padded_vocab_size=PADDED_VOCAB,
        make_vocab_size_divisible_by=128,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        num_experts=None,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        bf16=True,
        fp16=False,
        params_dtype=torch.bfloat16,
        tokenizer_type="SentencePiece",
        sp_model_file="/mnt/weka/vocabularies/adept_vocab.model",
        use_flash_attn=True,
        micro_batch_size=1,
        global_batch_size=256,
        lr=1e-4,
        rampup_batch_size=None,
        consumed_train_samples=320256,
        iteration=ITERATION,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def megatron_model(seed: int = 0, dtype=torch.bfloat16) -> dict:
    """Random weights in the release's exact nesting and names (adept-inference)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, norm=False):
        noise = torch.randn(shape, generator=g)
        return (1.0 + 0.1 * noise if norm else 0.1 * noise).to(dtype)

    head_dim = HIDDEN // HEADS
    rotary_dim = int(head_dim * ROTARY_PCT)
    inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    encoder = {}
    for i in range(LAYERS):
        p = f"layers.{i}."
        encoder.update(
            {
                p + "input_layernorm.weight": rand(HIDDEN, norm=True),
                p + "input_layernorm.bias": rand(HIDDEN),
                p + "self_attention.query_key_value.weight": rand(3 * HIDDEN, HIDDEN),
                p + "self_attention.query_key_value.bias": rand(3 * HIDDEN),
                p + "self_attention.q_layernorm.weight": rand(head_dim, norm=True),
                p + "self_attention.q_layernorm.bias": rand(head_dim),
                p + "self_attention.k_layernorm.weight": rand(head_dim, norm=True),
                p + "self_attention.k_layernorm.bias": rand(head_dim),
                p + "self_attention.dense.weight": rand(HIDDEN, HIDDEN),
                p + "self_attention.dense.bias": rand(HIDDEN),
                p + "self_attention.rotary_emb.inv_freq": inv_freq.to(dtype),  # Float16Module casts buffers
                p + "post_attention_layernorm.weight": rand(HIDDEN, norm=True),
                p + "post_attention_layernorm.bias": rand(HIDDEN),
                p + "mlp.dense_h_to_4h.weight": rand(FFN, HIDDEN),
                p + "mlp.dense_h_to_4h.bias": rand(FFN),
                p + "mlp.dense_4h_to_h.weight": rand(HIDDEN, FFN),
                p + "mlp.dense_4h_to_h.bias": rand(HIDDEN),
            }
        )
    encoder["final_layernorm.weight"] = rand(HIDDEN, norm=True)
    encoder["final_layernorm.bias"] = rand(HIDDEN)
    return {
        "language_model": {
            "embedding": {"word_embeddings": {"weight": rand(PADDED_VOCAB, HIDDEN)}},
            "encoder": encoder,
        },
        "word_embeddings_for_head": {"weight": rand(PADDED_VOCAB, HIDDEN)},
    }


def save_checkpoint(path: Path, payload) -> Path:
    """torch.save with `megatron.model.enums` importable, as when Megatron wrote the release."""
    parents = {"megatron": types.ModuleType("megatron"), "megatron.model": types.ModuleType("megatron.model")}
    saved = {name: sys.modules.get(name) for name in (*parents, "megatron.model.enums")}
    sys.modules.update(parents)
    sys.modules["megatron.model.enums"] = _MEGATRON_ENUMS
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, path)
    finally:  # the loader must not be able to import megatron: it uses its own stand-ins
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return path


def release_checkpoint(args=None, model=None, with_model_type=True) -> dict:
    args = args if args is not None else megatron_args()
    if with_model_type:
        args.model_type = _ModelType.encoder_or_decoder
    rng_state = [
        {
            "random_rng_state": random.Random(0).getstate(),
            "np_rng_state": np.random.RandomState(0).get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
            "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)},
        }
    ]
    return {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": ITERATION,
        "model": model if model is not None else megatron_model(),
        "rng_state": rng_state,
    }


def write_release(root: Path, payload=None) -> Path:
    """<root>/latest_checkpointed_iteration.txt + iter_0001251/mp_rank_00/model_optim_rng.pt"""
    root.mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text(f"{ITERATION}\n")
    save_checkpoint(
        root / f"iter_{ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt",
        payload if payload is not None else release_checkpoint(),
    )
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_release(tmp_path_factory.mktemp("release") / "8b_base_model_release")


@pytest.fixture(scope="module")
def converted_fp32(release, adept_vocab, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a faithful release converts without a single warning
        convert_adept_checkpoint(release, adept_vocab, out, dtype=torch.float32)
    return out


# --------------------------------------------------------------------------- reference mapping

# transformers' own converter, src/transformers/models/persimmon/convert_persimmon_weights_to_hf.py
# (huggingface/transformers), re-implemented exactly because the script is not shipped in the
# wheel and needs `flatdict`: it flattens checkpoint["model"] with flatdict.FlatDict(..., ".")
# and renames with this table, in this order, dropping keys containing KEYS_TO_REMOVE; then it
# load_state_dict()s into a bfloat16 PersimmonForCausalLM (strict).
KEYS_TO_MODIFY_MAPPING = {
    "self_attention": "self_attn",
    "language_model.encoder": "model",
    "word_embeddings_for_head": "lm_head",
    "language_model.embedding.word_embeddings": "model.embed_tokens",
    # final layer norm?
}
KEYS_TO_REMOVE = "rotary_emb.inv_freq"


def _flatdict(nested: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(_flatdict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def transformers_rename_state_dict(state_dict):
    model_state_dict = {}
    for key, value in state_dict.items():
        for key_to_modify, new_key in KEYS_TO_MODIFY_MAPPING.items():
            if key_to_modify in key:
                key = key.replace(key_to_modify, new_key)
        if KEYS_TO_REMOVE in key:
            continue
        model_state_dict[key] = value
    return model_state_dict


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in iter_weights_folder(folder)}


# --------------------------------------------------------------------------- tests: conversion


def test_logits_match_transformers_on_converted_release(converted_fp32):
    import transformers

    ours = PersimmonForCausalLM.from_pretrained(converted_fp32, dtype=torch.float32).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(converted_fp32, dtype=torch.float32).eval()
    ids = torch.randint(0, PADDED_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits = ours(ids).logits
        hf_logits = hf(ids).logits
    assert ours_logits.shape == (2, 24, PADDED_VOCAB)
    torch.testing.assert_close(ours_logits, hf_logits, rtol=1e-5, atol=1e-5)
    # transformers reads the numbers from args too, not its defaults.
    assert hf.config.rope_parameters["rope_theta"] == ROTARY_BASE
    assert hf.config.rope_parameters["partial_rotary_factor"] == ROTARY_PCT


def test_config_comes_from_args_and_tokenizer(converted_fp32, adept_vocab):
    import sentencepiece as spm

    config = json.loads((converted_fp32 / "config.json").read_text())
    end_of_text = spm.SentencePieceProcessor(model_file=str(adept_vocab)).piece_to_id("|ENDOFTEXT|")
    assert end_of_text not in (0, 1, 2)  # a user-defined piece, so it cannot pass by accident
    assert config["rope_theta"] == ROTARY_BASE and config["rope_parameters"]["rope_theta"] == ROTARY_BASE
    assert config["partial_rotary_factor"] == ROTARY_PCT
    assert config["layer_norm_eps"] == EPS
    assert (
        config["hidden_size"],
        config["num_attention_heads"],
        config["intermediate_size"],
        config["num_hidden_layers"],
        config["max_position_embeddings"],
    ) == (HIDDEN, HEADS, FFN, LAYERS, 64)
    assert config["vocab_size"] == PADDED_VOCAB  # the embedding's rows, not the tokenizer's 300
    assert config["qk_layernorm"] is True and config["hidden_act"] == "relu2"
    assert config["bos_token_id"] == config["eos_token_id"] == end_of_text
    generation = json.loads((converted_fp32 / "generation_config.json").read_text())
    assert generation["bos_token_id"] == generation["eos_token_id"] == end_of_text
    assert (converted_fp32 / "tokenizer.model").read_bytes() == adept_vocab.read_bytes()
    assert json.loads((converted_fp32 / "special_tokens_map.json").read_text())["eos_token"] == "|ENDOFTEXT|"


def test_tensors_equal_transformers_converter_mapping(release, adept_vocab, tmp_path):
    """Default bf16, sharded: tensor for tensor what transformers' converter would write."""
    import transformers

    out = tmp_path / "bf16"
    result = convert_adept_checkpoint(release, adept_vocab, out, max_shard_size="40KB")
    assert len(result.weight_files) > 1 and (out / "model.safetensors.index.json").is_file()
    ours = read_folder(out)

    # The converter unpickles with full trust (adept-inference on sys.path); the release fixture's
    # model is deterministic, so rebuild it rather than import a fake megatron to unpickle it.
    reference = transformers_rename_state_dict(_flatdict(megatron_model()))
    hf_model = transformers.PersimmonForCausalLM(transformers.PersimmonConfig.from_pretrained(out)).to(torch.bfloat16)
    hf_model.load_state_dict(reference, strict=True)  # what the converter does next
    expected = {k: v for k, v in hf_model.state_dict().items()}

    assert set(ours) == set(expected) == set(reference)
    for name, tensor in expected.items():
        assert ours[name].dtype == torch.bfloat16, name
        assert torch.equal(ours[name], tensor), name
    assert result.num_parameters == sum(t.numel() for t in ours.values())
    assert result.iteration == ITERATION


def test_fp32_conversion_is_exact_and_our_model_loads_it(converted_fp32):
    reference = transformers_rename_state_dict(_flatdict(megatron_model()))
    ours = read_folder(converted_fp32)
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], tensor.float()), name
    model = PersimmonForCausalLM.from_pretrained(converted_fp32)
    assert torch.equal(model.lm_head.weight, reference["lm_head.weight"].float())


@pytest.mark.parametrize("form", ["release", "iteration", "rank", "file"])
def test_accepts_file_or_any_release_folder(release, form):
    rank = release / f"iter_{ITERATION:07d}" / "mp_rank_00"
    path = {"release": release, "iteration": rank.parent, "rank": rank, "file": rank / "model_optim_rng.pt"}[form]
    assert Path(find_checkpoint_file(path)) == rank / "model_optim_rng.pt"


def test_tied_embeddings_reuse_the_input_embedding(tmp_path, adept_vocab):
    model = megatron_model()
    del model["word_embeddings_for_head"]
    ckpt = save_checkpoint(
        tmp_path / "tied.pt", release_checkpoint(args=megatron_args(untie_embeddings=None), model=model)
    )
    convert_adept_checkpoint(ckpt, adept_vocab, tmp_path / "out", dtype=torch.float32)
    weights = read_folder(tmp_path / "out")
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])


def test_tokenizer_without_endoftext_falls_back_to_its_own_ids(tmp_path, release):
    vocab = _train_sentencepiece(tmp_path, "plain", [])
    with pytest.warns(UserWarning, match=r"\|ENDOFTEXT\|"):
        result = convert_adept_checkpoint(release, vocab, tmp_path / "out")
    assert (result.config.bos_token_id, result.config.eos_token_id) == (1, 2)


def test_rotary_base_that_disagrees_with_stored_inv_freq_warns(tmp_path, adept_vocab):
    ckpt = save_checkpoint(tmp_path / "base.pt", release_checkpoint(args=megatron_args(rotary_emb_base=10000)))
    with pytest.warns(UserWarning, match="inv_freq does not match rotary_emb_base=10000"):
        result = convert_adept_checkpoint(ckpt, adept_vocab, tmp_path / "out")
    assert result.config.rope_theta == 10000  # args win; the warning says so


# --------------------------------------------------------------------------- tests: errors


def _convert_error(path, adept_vocab, tmp_path) -> str:
    with pytest.raises(WeightsError) as info:
        convert_adept_checkpoint(path, adept_vocab, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
    return str(info.value)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_named(tmp_path, adept_vocab):
    marker = tmp_path / "pwned"
    payload = release_checkpoint()
    payload["rng_state"] = _Payload(str(marker))
    ckpt = save_checkpoint(tmp_path / "evil" / "model_optim_rng.pt", payload)
    message = _convert_error(ckpt, adept_vocab, tmp_path)
    assert str(ckpt) in message and "system" in message and "weights_only" in message
    assert not marker.exists()


def test_missing_model_entry(tmp_path, adept_vocab):
    payload = release_checkpoint()
    del payload["model"]
    ckpt = save_checkpoint(tmp_path / "nomodel.pt", payload)
    message = _convert_error(ckpt, adept_vocab, tmp_path)
    assert str(ckpt) in message and "no 'model' entry" in message and "args" in message


def test_missing_args_entry(tmp_path, adept_vocab):
    payload = release_checkpoint()
    del payload["args"]
    ckpt = save_checkpoint(tmp_path / "noargs.pt", payload)
    message = _convert_error(ckpt, adept_vocab, tmp_path)
    assert str(ckpt) in message and "no 'args' entry" in message


def test_not_a_dict(tmp_path, adept_vocab):
    ckpt = save_checkpoint(tmp_path / "list.pt", [torch.zeros(3)])
    message = _convert_error(ckpt, adept_vocab, tmp_path)
    assert str(ckpt) in message and "not a Megatron checkpoint" in message and "list" in message


def test_missing_layer_tensor_is_named(tmp_path, adept_vocab):
    model = megatron_model()
    del model["language_model"]["encoder"]["layers.1.mlp.dense_4h_to_h.bias"]
    ckpt = save_checkpoint(tmp_path / "hole.pt", release_checkpoint(model=model))
    message = _convert_error(ckpt, adept_vocab, tmp_path)
    assert str(ckpt) in message and "language_model.encoder.layers.1.mlp.dense_4h_to_h.bias" in message


def test_shape_that_disagrees_with_args_is_named(tmp_path, adept_vocab):
    ckpt = save_checkpoint(tmp_path / "shape.pt", release_checkpoint(args=megatron_args(ffn_hidden_size=128)))
    message = _convert_error(ckpt, adept_vocab, tmp_path)
    assert "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight is (256, 64), expected (128, 64)" in message


def test_per_head_qk_layernorm_is_refused(tmp_path, adept_vocab):
    args = megatron_args(qk_layernorm="weights_per_attention_head_and_layer")
    ckpt = save_checkpoint(tmp_path / "perhead.pt", release_checkpoint(args=args))
    assert "weights_per_attention_head_and_layer" in _convert_error(ckpt, adept_vocab, tmp_path)


@pytest.mark.parametrize("content", [b"not a checkpoint\n" * 8, b"PK\x03\x04 truncated zip"])
def test_non_checkpoint_file(tmp_path, adept_vocab, content):
    path = tmp_path / "model_optim_rng.pt"
    path.write_bytes(content)
    message = _convert_error(path, adept_vocab, tmp_path)
    assert str(path) in message and "not a readable PyTorch checkpoint" in message


def test_tensor_parallel_shards_are_refused(tmp_path, adept_vocab):
    root = write_release(tmp_path / "tp")
    iteration = root / f"iter_{ITERATION:07d}"
    (iteration / "mp_rank_01").mkdir()
    for path in (root, iteration, iteration / "mp_rank_00" / "model_optim_rng.pt"):
        message = _convert_error(path, adept_vocab, tmp_path)
        assert "tensor-parallel" in message and "mp_rank_01" in message


def test_folder_without_checkpoint(tmp_path, adept_vocab):
    (tmp_path / "empty").mkdir()
    message = _convert_error(tmp_path / "empty", adept_vocab, tmp_path)
    assert str(tmp_path / "empty") in message and "model_optim_rng.pt" in message


# --------------------------------------------------------------------------- tests: recipe


def test_recipe_converts_and_reports(release, adept_vocab, tmp_path):
    out = tmp_path / "recipe_out"
    run = run_in_process(
        "convert-adept", f"checkpoint={release}", f"tokenizer={adept_vocab}", f"output_dir={out}", "dtype=fp32"
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout
    assert json.loads((out / "config.json").read_text())["rope_theta"] == ROTARY_BASE
    assert (out / "model.safetensors").is_file()


def test_recipe_user_error_is_one_line(tmp_path, adept_vocab):
    run = run_in_process(
        "convert-adept", f"checkpoint={tmp_path / 'nope'}", f"tokenizer={adept_vocab}", f"output_dir={tmp_path / 'o'}"
    )  # fmt: skip
    assert assert_one_line_error(run, "nope") == run.stderr.strip()  # the only line


def test_recipe_argument_errors_name_the_key():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_adept_recipe", REPO / "recipes" / "convert_adept.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    with pytest.raises(ConfigError, match="output_dir"):
        recipe.parse_args(["checkpoint=x", "tokenizer=y"])
    with pytest.raises(ConfigError, match="dtype"):
        recipe.parse_args(["checkpoint=x", "tokenizer=y", "output_dir=z", "dtype=fp8"])
    with pytest.raises(ConfigError, match="unknown argument"):
        recipe.parse_args(["checkpoint=x", "tokenizer=y", "output_dir=z", "shards=3"])
    assert recipe.parse_args(["checkpoint=x", "tokenizer=y", "output_dir=z"])["dtype"] == "bf16"
