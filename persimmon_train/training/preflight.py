"""Cheap checks that run before anything slow: config vs model config.json vs tokenizer vs data paths.

Data preparation (tokenizing and packing a real corpus) takes hours; a mistake that the model's
config.json or the tokenizer file already reveals must stop the run before it, not after. Every
check here reads a few small files (config.json, the tokenizer model, directory listings) and
raises a `ConfigError` / `DataError` naming the key or file. The launcher checks (WORLD_SIZE vs
strategy, DeepSpeed JSON vs trainer.*) live with the strategies, which are built before the data.

Each check lives here once: the builders (builders.build_model, build_data_bundle) rely on it and
do not repeat it. Train and evaluate both run it first.
"""

from __future__ import annotations

import logging
import os

from persimmon_train.errors import ConfigError

log = logging.getLogger("persimmon_train")


def _tokenizer_path(cfg) -> str | None:
    """Where builders.build_tokenizer will look (None: the shipped demo tokenizer)."""
    return cfg.tokenizer.path or cfg.model.path


def check_model_and_tokenizer(cfg) -> None:
    """model.path's config.json and the tokenizer against data.seq_len and each other."""
    from persimmon_train.data import Tokenizer
    from persimmon_train.model import PersimmonConfig
    from persimmon_train.training.config import check_seq_len

    m = cfg.model
    tok_path = _tokenizer_path(cfg)
    if tok_path is not None and not os.path.exists(tok_path):
        key = "tokenizer.path" if cfg.tokenizer.path else "model.path"
        raise ConfigError(f"{key}: {tok_path!r} does not exist")
    if m.path:
        if os.path.isfile(m.path):
            raise ConfigError(f"model.path: {m.path!r} is a file; give the model folder (config.json + safetensors)")
        if not os.path.isfile(os.path.join(m.path, "config.json")):
            raise ConfigError(f"model.path: {m.path!r} is not a model folder (no config.json)")
        config = PersimmonConfig.from_json_file(m.path)
        rope_scaling = dict(m.rope_scaling) if m.rope_scaling else config.rope_scaling
        check_seq_len(cfg.data.seq_len, config.max_position_embeddings, rope_scaling, f"{m.path}/config.json")
        model_vocab = config.vocab_size
    else:
        model_vocab = m.vocab_size  # None: sized to the tokenizer
    if model_vocab is not None:
        if tok_path is None:
            from persimmon_train.data import demo_assets

            tok_path = str(demo_assets().tokenizer_path)
        tokenizer = Tokenizer(tok_path)  # a sentencepiece model: milliseconds, even at 262K pieces
        if tokenizer.vocab_size > model_vocab:
            raise ConfigError(
                f"model.vocab_size: the model has {model_vocab} token embeddings but the tokenizer "
                f"{tok_path} has {tokenizer.vocab_size} pieces; use the model's tokenizer"
            )


def check_data_paths(cfg) -> None:
    """Every data.train_files / data.eval_files entry names something that exists (globs match)."""
    from persimmon_train.data.sources import resolve

    cfg.data.validate()
    resolve(list(cfg.data.train_files))
    resolve(list(cfg.data.eval_files))


def check_output_dir(cfg) -> None:
    if cfg.output_dir and os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise ConfigError(f"output_dir: {cfg.output_dir!r} exists and is not a folder")


def preflight(cfg, job: str) -> None:
    """All cheap checks for a training run of `job`; raises on the first mistake, writes nothing."""
    check_output_dir(cfg)
    check_data_paths(cfg)
    check_model_and_tokenizer(cfg)
