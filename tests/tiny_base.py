"""A tiny Persimmon over the shipped demo tokenizer, saved as an HF folder: the `model.path` that the
recipe, export and preflight tests start from (one definition instead of one per test file)."""

from __future__ import annotations

from pathlib import Path

import torch


def demo_tokenizer(cache_dir: Path | str | None = None):
    """The shipped demo tokenizer (`cache_dir`: the run's PERSIMMON_TRAIN_CACHE/demo, else the default)."""
    from persimmon_train.data import Tokenizer, demo_assets

    return Tokenizer((demo_assets(Path(cache_dir)) if cache_dir else demo_assets()).tokenizer_path)


def tiny_base_config(
    tokenizer,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    max_position_embeddings: int = 256,
):
    """A PersimmonConfig over `tokenizer`'s vocabulary and special ids (defaults: the recipes' FAST sizes)."""
    from persimmon_train.model import PersimmonConfig

    return PersimmonConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )


def save_tiny_base(folder: Path, tokenizer, config, *, seed: int = 0, dtype: torch.dtype | None = None, **save_kwargs):
    """A seeded random causal LM of `config` + the tokenizer, written as an HF folder (in `dtype`,
    e.g. bf16 like the released files; default float32); returns the model."""
    from persimmon_train.model import PersimmonForCausalLM

    torch.manual_seed(seed)
    model = PersimmonForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **save_kwargs)
    tokenizer.save_pretrained(folder)
    return model
