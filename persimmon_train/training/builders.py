"""Config -> objects: output folder, logging, tokenizer, data, model (+ LoRA, checkpointing), strategy."""

from __future__ import annotations

import logging
import os
import random
import sys
import time

import numpy as np
import torch

from persimmon_train.errors import ConfigError
from persimmon_train.training.trackers import redact_secrets

log = logging.getLogger("persimmon_train")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_output_dir(cfg, job: str, strategy) -> str:
    """output_dir, or outputs/<job>/<timestamp> (the same folder on every rank). Creates nothing:
    only checks that the folder could be written (not a file, parent writable)."""
    from persimmon_train.storage import check_writable_folder

    if cfg.output_dir:
        path = cfg.output_dir
    else:
        path = strategy.broadcast_object(os.path.join("outputs", job, time.strftime("%Y%m%d-%H%M%S")))
    return check_writable_folder(path, "output_dir")


def create_output_dir(path: str, strategy) -> None:
    """Called once config, data, model and checkpoint have validated."""
    from persimmon_train.storage import disk_errors

    if strategy.is_main:
        with disk_errors(path, "creating"):
            os.makedirs(path, exist_ok=True)
    strategy.barrier()


class _TqdmHandler(logging.StreamHandler):
    """Console logging that does not break the progress bar."""

    def emit(self, record):
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


class _Redact(logging.Filter):
    def filter(self, record):
        record.msg = redact_secrets(str(record.msg))
        return True


class _EarlyRecords(logging.Handler):
    """Holds what is logged before output_dir may be written, for train.log to start with."""

    def __init__(self, limit: int = 10_000):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.limit = limit

    def emit(self, record):
        if len(self.records) < self.limit:
            self.records.append(record)


def setup_logging(output_dir: str | None, is_main: bool) -> None:
    """Console (rank 0) + output_dir/train.log (rank 0) for the `persimmon_train` loggers.

    output_dir=None: console only, while the run validates; what is logged meanwhile is kept and
    written at the top of train.log by `add_file_logging` once the folder may be touched.
    """
    root = logging.getLogger("persimmon_train")
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.propagate = False
    if not is_main:
        root.addHandler(logging.NullHandler())
        return
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    console.addFilter(_Redact())
    root.addHandler(console)
    if output_dir is not None:
        add_file_logging(output_dir, is_main)
    else:
        root.addHandler(_EarlyRecords())


def add_file_logging(output_dir: str, is_main: bool) -> None:
    """output_dir/train.log (rank 0), once the output folder may be written; starts with the
    start-up lines logged while the run validated (strategy, precision, model, dropout, ...)."""
    if not is_main:
        return
    root = logging.getLogger("persimmon_train")
    logfile = logging.FileHandler(os.path.join(output_dir, "train.log"), encoding="utf-8")
    logfile.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logfile.addFilter(_Redact())
    for early in [h for h in root.handlers if isinstance(h, _EarlyRecords)]:
        for record in early.records:
            logfile.handle(record)
        root.removeHandler(early)
    root.addHandler(logfile)


def build_strategy(cfg):
    from persimmon_train.parallel import build_strategy_from_config

    return build_strategy_from_config(cfg)


def build_tokenizer(cfg):
    """tokenizer.path, else the model folder, else the shipped demo tokenizer."""
    from persimmon_train.data import Tokenizer, demo_assets

    path = cfg.tokenizer.path or cfg.model.path or demo_assets().tokenizer_path
    if not os.path.exists(path):
        key = "tokenizer.path" if cfg.tokenizer.path else "model.path"
        raise ConfigError(f"{key}: {path!r} does not exist")
    return Tokenizer(path)


def build_data_bundle(cfg, tokenizer, strategy):
    from persimmon_train.data import build_data

    data_cfg = cfg.data  # validated by preflight (and again by build_data itself)
    # Rank 0 prepares (and caches) the data first; the other ranks then read its cache.
    if not strategy.is_main:
        strategy.barrier()
    try:
        return build_data(
            data_cfg,
            tokenizer,
            micro_batch_size=cfg.trainer.micro_batch_size,
            seed=cfg.trainer.seed,
            rank=strategy.rank,
            world_size=strategy.world_size,
        )
    finally:
        if strategy.is_main:
            strategy.barrier()


def model_class(task: str):
    from persimmon_train.model import HEADS

    return HEADS[task]


def _config_overrides(cfg, tokenizer, data) -> dict:
    m = cfg.model
    overrides = {
        k: getattr(m, k)
        for k in ("hidden_dropout", "attention_dropout", "classifier_dropout")
        if getattr(m, k) is not None
    }
    overrides["attention"] = m.attention  # a runtime choice, never read from config.json
    if cfg.task != "causal_lm" and data is not None and data.num_labels:
        overrides.update(
            num_labels=data.num_labels,
            id2label=dict(data.id2label),
            label2id=dict(data.label2id),
            problem_type=data.problem_type,
        )
    return overrides


def build_model(cfg, tokenizer, data=None, meta: bool = False):
    """A random init of the model config's architecture (seeded by the caller), or model.path's weights.

    `preflight` has checked what would make it fail late: model.path is a model folder, data.seq_len
    fits its positions, the tokenizer fits its vocabulary. meta=True (with model.path): shapes only,
    on the meta device; a sharding strategy then loads each rank's part of model.path itself (no
    process ever holds the whole model).
    """
    from persimmon_train.model import PersimmonConfig

    m = cfg.model
    head = model_class(cfg.task)
    overrides = _config_overrides(cfg, tokenizer, data)
    if m.path:
        if m.rope_scaling:
            overrides["rope_scaling"] = dict(m.rope_scaling)
        if meta:
            with torch.device("meta"):
                model = head(PersimmonConfig.from_json_file(m.path).replace(**overrides))
        else:
            model = head.from_pretrained(m.path, dtype=torch.float32, **overrides)
        if model.config.pad_token_id is None and tokenizer.pad_id is not None:
            model.config.pad_token_id = tokenizer.pad_id
    else:
        ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        config = m.architecture(vocab_size=m.vocab_size or tokenizer.vocab_size, **ids, **overrides)
        model = head.from_config(config)
    log.info(
        "model: %s (%s), %.2fM parameters; dropout: hidden=%s attention=%s (model.hidden_dropout / "
        "model.attention_dropout)",
        m.path or f"random init '{m.name}'",
        type(model).__name__,
        model.num_parameters() / 1e6,
        model.config.hidden_dropout,
        model.config.attention_dropout,
    )
    return model


def prepare_for_training(model, cfg, training: bool = True):
    """LoRA (peft=lora) and activation checkpointing on the plain model."""
    from persimmon_train.parallel.activation_checkpointing import apply_activation_checkpointing

    if cfg.peft.method == "lora":
        from persimmon_train.adapters import apply_lora

        model = apply_lora(model, cfg.peft, cfg.task)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info(
            "LoRA r=%d alpha=%s dropout=%s on %s: %.3fM of %.2fM parameters trainable",
            cfg.peft.r,
            cfg.peft.alpha,
            cfg.peft.dropout,
            list(cfg.peft.target_modules),
            trainable / 1e6,
            total / 1e6,
        )
    elif training:
        log.info("full fine-tuning: all %.2fM parameters trainable", model.num_parameters() / 1e6)
    layers = apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
    if layers:
        log.info("activation checkpointing on layers %s", layers)
    if training and cfg.trainer.compile:
        # After checkpointing, before the strategy shards each layer (torchtitan's order).
        from persimmon_train.parallel.compile import compile_decoder_layers

        compile_decoder_layers(model)
    return model
