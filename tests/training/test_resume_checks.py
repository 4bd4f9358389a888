"""A checkpoint resumes only into the run that wrote it: checked from its manifest, one line naming the key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from persimmon_train.errors import CheckpointError
from persimmon_train.model import PersimmonForCausalLM, PersimmonForSequenceClassification
from persimmon_train.training.checkpointing import check_resumable
from persimmon_train.training.config import RunConfig
from tests.helpers import tiny_config


def _manifest(cfg, config, strategy=("single", 1), architecture="PersimmonForCausalLM"):
    from persimmon_train.adapters import peft_settings

    return {
        "strategy": {"name": strategy[0], "world_size": strategy[1]},
        "model": {"architecture": architecture, "config": config.to_dict()},
        "peft": peft_settings(cfg.peft) if cfg.peft.method == "lora" else None,
    }


def _lora_cfg(r=16):
    cfg = RunConfig()
    cfg.peft.method, cfg.peft.r = "lora", r
    return cfg


def test_same_run_resumes():
    cfg, config = _lora_cfg(), tiny_config()
    check_resumable(
        "ckpt", _manifest(cfg, config), cfg, config, PersimmonForCausalLM, SimpleNamespace(name="single", world_size=1)
    )


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda cfg, config: setattr(cfg.peft, "r", 8), "peft.r"),
        (lambda cfg, config: setattr(cfg.peft, "alpha", 64.0), "peft.alpha"),
        (lambda cfg, config: setattr(cfg.peft, "method", "none"), "peft=none"),
        (
            lambda cfg, config: setattr(config, "num_hidden_layers", config.num_hidden_layers + 1),
            "model.num_hidden_layers",
        ),
        (lambda cfg, config: setattr(config, "hidden_size", config.hidden_size * 2), "model.hidden_size"),
    ],
)
def test_a_different_run_is_refused_naming_the_key(change, key):
    cfg, config = _lora_cfg(), tiny_config()
    manifest = _manifest(cfg, config)
    change(cfg, config)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        check_resumable("ckpt", manifest, cfg, config, PersimmonForCausalLM)


def test_another_head_is_refused():
    cfg, config = _lora_cfg(), tiny_config()
    with pytest.raises(CheckpointError, match="PersimmonForCausalLM run"):
        check_resumable("ckpt", _manifest(cfg, config), cfg, config, PersimmonForSequenceClassification)


@pytest.mark.parametrize("now", ["fsdp", "single"])
def test_deepspeed_checkpoints_resume_only_under_deepspeed(now):
    cfg, config = _lora_cfg(), tiny_config()
    manifest = _manifest(cfg, config, strategy=("deepspeed", 2))
    with pytest.raises(CheckpointError, match=f"resume only with strategy=deepspeed .*strategy={now}"):
        check_resumable("ckpt", manifest, cfg, config, PersimmonForCausalLM, SimpleNamespace(name=now, world_size=2))
    # Any number of ranks under DeepSpeed (parallel/zero_reshard.py; tests/distributed/test_checkpoints.py).
    for ranks in (1, 2, 4):
        check_resumable(
            "ckpt", manifest, cfg, config, PersimmonForCausalLM, SimpleNamespace(name="deepspeed", world_size=ranks)
        )
