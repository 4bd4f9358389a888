"""strategy.config_file=ds.json: "auto" filled from trainer.* / optim.*, disagreements refused in one line.

Fast: the checks are pure functions (no DeepSpeed engine); one recipe run proves the exit code.
"""

from __future__ import annotations

import json

import pytest

from persimmon_train.errors import ConfigError
from persimmon_train.parallel.ds_config import check_user_config, fill_model_autos, read_user_config
from persimmon_train.training.config import OptimConfig
from tests.helpers import FAST, assert_one_line_error, recipe_env, run_recipe

# The shape of a typical HF-Trainer DeepSpeed JSON: everything the trainer decides is "auto".
HF_STYLE = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {
        "type": "WarmupCosineLR",
        "params": {
            "warmup_num_steps": "auto",
            "total_num_steps": "auto",
            "warmup_max_lr": "auto",
            "warmup_min_lr": "auto",
        },
    },
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": False,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
    },
}


def _optim(**kw) -> OptimConfig:
    optim = OptimConfig(
        lr=3e-4,
        weight_decay=0.1,
        beta1=0.9,
        beta2=0.95,
        eps=1e-8,
        grad_clip=1.0,
        schedule="cosine",
        warmup_steps=5,
        min_lr_ratio=0.1,
    )
    for key, value in kw.items():
        setattr(optim, key, value)
    return optim


def _check(config, precision="bf16", optim=None, **kw):
    args = dict(
        micro_batch_size=4,
        grad_accum_steps=2,
        world_size=8,
        grad_clip=1.0,
        precision=precision,
        optim=optim or _optim(),
        max_steps=100,
    )
    args.update(kw)
    return check_user_config(config, "ds.json", **args)


def test_hf_style_autos_are_filled_from_the_trainer():
    out = _check(HF_STYLE)
    assert out["train_micro_batch_size_per_gpu"] == 4
    assert out["gradient_accumulation_steps"] == 2
    assert out["train_batch_size"] == 4 * 2 * 8
    assert out["gradient_clipping"] == 1.0
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False
    # Checked, then left to the trainer's AdamW + LambdaLR (DeepSpeed refuses a second optimizer).
    assert "optimizer" not in out and "scheduler" not in out
    assert out["zero_optimization"]["overlap_comm"] is False  # the user's own knobs pass through
    fill_model_autos(out, 64, "ds.json")
    zero = out["zero_optimization"]
    assert (
        zero["reduce_bucket_size"],
        zero["stage3_prefetch_bucket_size"],
        zero["stage3_param_persistence_threshold"],
    ) == (64 * 64, int(0.9 * 64 * 64), 640)
    assert HF_STYLE["train_batch_size"] == "auto"  # the user's dict is not modified


def test_fp32_and_absent_keys_are_filled_too():
    out = _check({"zero_optimization": {"stage": 2}}, precision="fp32", grad_clip=None)
    assert out["bf16"]["enabled"] is False and out["gradient_clipping"] == 0.0
    assert (out["train_micro_batch_size_per_gpu"], out["train_batch_size"]) == (4, 64)


def test_agreeing_explicit_values_pass():
    config = dict(
        HF_STYLE,
        train_micro_batch_size_per_gpu=4,
        train_batch_size=64,
        gradient_clipping=1,
        optimizer={"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
        scheduler={
            "type": "WarmupCosineLR",
            "params": {"warmup_num_steps": 5, "total_num_steps": 100, "cos_min_ratio": 0.1},
        },
    )
    _check(config)


@pytest.mark.parametrize(
    "change,key",
    [
        (
            {"train_micro_batch_size_per_gpu": 2},
            "train_micro_batch_size_per_gpu: 2 but trainer.micro_batch_size gives 4",
        ),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps: 4 but trainer.grad_accum_steps"),
        ({"train_batch_size": 32}, "train_batch_size: 32 but"),
        ({"gradient_clipping": 0.5}, "gradient_clipping: 0.5 but optim.grad_clip"),
        ({"bf16": {"enabled": False}}, "bf16.enabled: False but trainer.precision=bf16"),
        ({"fp16": {"enabled": True}}, "fp16.enabled: true, but the trainer runs bf16 or fp32"),
        ({"amp": {"enabled": True}}, "amp.enabled"),
        ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage: 0"),
        ({"zero_optimization": {"offload_param": {"device": "cpu"}, "stage": 2}}, "offload_param: needs"),
        ({"optimizer": {"type": "Lamb"}}, "optimizer.type: 'Lamb'"),
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
            "optimizer.params.lr: 0.001 but optim.lr gives 0.0003",
        ),
        ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999]}}}, "optimizer.params.betas"),
        ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, "optimizer.params.adam_w_mode"),
        ({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}}, "optimizer.params.amsgrad"),
        (
            {"scheduler": {"type": "WarmupLR"}},
            "scheduler.type: WarmupLR is warmup + constant but optim.schedule is cosine",
        ),
        ({"scheduler": {"type": "OneCycle"}}, "scheduler.type: 'OneCycle'"),
        (
            {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 50}}},
            "scheduler.params.total_num_steps: 50 but trainer.max_steps gives 100",
        ),
        ({"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_type": "log"}}}, "warmup_type"),
    ],
)
def test_what_the_trainer_cannot_honour_is_named(change, key):
    config = {**HF_STYLE, **change}
    with pytest.raises(ConfigError) as err:
        _check(config)
    message = str(err.value)
    assert message.startswith("strategy.config_file: ds.json: ") and "\n" not in message
    assert key in message


def test_decay_to_zero_needs_min_lr_ratio_zero():
    config = {**HF_STYLE, "scheduler": {"type": "WarmupDecayLR", "params": {}}}
    with pytest.raises(ConfigError, match="WarmupDecayLR decays to 0 but optim.min_lr_ratio is 0.1"):
        _check(config, optim=_optim(schedule="linear"))
    _check(config, optim=_optim(schedule="linear", min_lr_ratio=0.0))


def test_an_auto_the_trainer_cannot_fill_is_named():
    out = _check({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}})
    with pytest.raises(ConfigError, match=r"ds.json: zero_optimization.sub_group_size: \"auto\" is not"):
        fill_model_autos(out, 64, "ds.json")


def test_json_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  "bf16": {"enabled": "auto"}\n  "x": 1\n}\n')
    with pytest.raises(ConfigError, match=r"ds.json line 4 column 3: Expecting ',' delimiter"):
        read_user_config(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        read_user_config(str(path))
    with pytest.raises(ConfigError, match="cannot read .*missing.json"):
        read_user_config(str(tmp_path / "missing.json"))


@pytest.mark.slow  # a child: the strategy starts DeepSpeed (its CPU op, built with ninja) before this check
def test_recipe_refuses_a_conflicting_json_in_one_line_exit_2(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**HF_STYLE, "train_micro_batch_size_per_gpu": 3}))
    out = tmp_path / "out"
    proc = run_recipe(
        "finetune",
        *FAST,
        "strategy=deepspeed",
        f"strategy.config_file={path}",
        "trainer.max_steps=1",
        f"output_dir={out}",
        env=recipe_env(tmp_path),
        check=False,
    )
    assert_one_line_error(proc, "ds.json: train_micro_batch_size_per_gpu: 3 but trainer.micro_batch_size gives 8")
