"""The DeepSpeed config of a run: generated from our keys, or a user's JSON checked against them.

`strategy.config_file=ds.json` lets a team keep its own DeepSpeed JSON (ZeRO buckets, offload,
communication knobs). The trainer still decides the batch layout, clipping, precision, optimizer
and LR schedule, so every key that overlaps a `trainer.*` / `optim.*` key must be `"auto"`
(filled from ours, as HF's Trainer does), absent, or equal to ours. Anything the trainer cannot
honour is a one-line ConfigError naming the file and the key -- never a silent difference.

`optimizer` / `scheduler` sections are checked and then dropped from what DeepSpeed sees: the
optimizer is always our torch AdamW (passed to deepspeed.initialize as the client optimizer) and
the schedule our LambdaLR; DeepSpeed refuses a config optimizer next to a client one.
"""

from __future__ import annotations

import copy
import json
import math

from persimmon_train.errors import ConfigError

AUTO = "auto"
# DeepSpeed scheduler type -> optim.schedule it corresponds to (warmup then ...).
SCHEDULES = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_ds_config(
    *,
    stage: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    grad_clip: float | None,
    precision: str,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    nvme_path: str | None = None,
    extra: dict | None = None,
) -> dict:
    """The DeepSpeed JSON our keys mean."""
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if offload_optimizer != "none":
        zero["offload_optimizer"] = {
            "device": offload_optimizer,
            "pin_memory": True,
            **({"nvme_path": nvme_path} if offload_optimizer == "nvme" else {}),
        }
    if offload_param != "none":
        zero["offload_param"] = {
            "device": offload_param,
            "pin_memory": True,
            **({"nvme_path": nvme_path} if offload_param == "nvme" else {}),
        }
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": float(grad_clip) if grad_clip else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # Our AdamW (torch) under ZeRO, also with offload (DeepSpeedCPUAdam would need a compiled op).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(config, extra or {})


def read_user_config(path: str) -> dict:
    """The JSON object in `path`; a missing file or a syntax error is one line with file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"strategy.config_file: cannot read {path} ({exc.strerror or exc})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"strategy.config_file: {path} line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"strategy.config_file: {path} must hold a JSON object, not {type(config).__name__}")
    return config


class _Checker:
    """Fills `"auto"` / absent keys with the trainer's value; refuses a different explicit value."""

    def __init__(self, config: dict, path: str):
        self.config, self.path = config, path

    def fail(self, key: str, why: str):
        raise ConfigError(f"strategy.config_file: {self.path}: {key}: {why}")

    def agree(self, section: dict, key: str, dotted: str, ours, source: str, *, same=None) -> None:
        value = section.get(key, AUTO)
        if value == AUTO:
            section[key] = ours
            return
        same = same or (lambda a, b: a == b)
        try:
            ok = same(value, ours)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            self.fail(dotted, f'{value!r} but {source} gives {ours!r} (set it to "auto" or to {ours!r})')


def _close(a, b) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)


def _check_optimizer(c: _Checker, section: dict, optim) -> None:
    kind = str(section.get("type", "")).lower()
    if kind not in ("adam", "adamw"):
        c.fail(
            "optimizer.type",
            f'{section.get("type")!r}: the trainer\'s optimizer is AdamW (optim.*); use "AdamW" or remove the section',
        )
    params = dict(section.get("params") or {})
    params.pop("torch_adam", None)  # which Adam kernel: ours is torch's either way
    if params.pop("adam_w_mode", True) is not True:
        c.fail("optimizer.params.adam_w_mode", "false (L2 Adam); the trainer's optimizer is AdamW")
    c.agree(params, "lr", "optimizer.params.lr", optim.lr, "optim.lr", same=_close)
    c.agree(
        params,
        "betas",
        "optimizer.params.betas",
        [optim.beta1, optim.beta2],
        "optim.beta1/beta2",
        same=lambda a, b: len(a) == 2 and all(_close(x, y) for x, y in zip(a, b)),
    )
    c.agree(params, "eps", "optimizer.params.eps", optim.eps, "optim.eps", same=_close)
    c.agree(
        params, "weight_decay", "optimizer.params.weight_decay", optim.weight_decay, "optim.weight_decay", same=_close
    )
    for key in set(params) - {"lr", "betas", "eps", "weight_decay"}:
        c.fail(f"optimizer.params.{key}", "not an AdamW setting the trainer has (optim.*); remove it")
    section["params"] = params


def _check_scheduler(c: _Checker, section: dict, optim, max_steps: int) -> None:
    kind = section.get("type")
    if kind not in SCHEDULES:
        c.fail(
            "scheduler.type",
            f"{kind!r}: the LR schedule is optim.schedule (warmup + cosine | linear | "
            f"constant); use one of {sorted(SCHEDULES)} or remove the section",
        )
    if SCHEDULES[kind] != optim.schedule:
        c.fail("scheduler.type", f"{kind} is warmup + {SCHEDULES[kind]} but optim.schedule is {optim.schedule}")
    params = dict(section.get("params") or {})
    c.agree(params, "warmup_num_steps", "scheduler.params.warmup_num_steps", optim.warmup_steps, "optim.warmup_steps")
    c.agree(params, "warmup_max_lr", "scheduler.params.warmup_max_lr", optim.lr, "optim.lr", same=_close)
    c.agree(params, "warmup_min_lr", "scheduler.params.warmup_min_lr", 0.0, "the trainer's linear warmup", same=_close)
    if params.get("warmup_type", "linear") != "linear":
        c.fail("scheduler.params.warmup_type", f"{params['warmup_type']!r}: the trainer's warmup is linear")
    if kind != "WarmupLR":
        c.agree(params, "total_num_steps", "scheduler.params.total_num_steps", max_steps, "trainer.max_steps")
    if kind == "WarmupDecayLR" and optim.min_lr_ratio != 0:
        c.fail("scheduler.type", f"WarmupDecayLR decays to 0 but optim.min_lr_ratio is {optim.min_lr_ratio}")
    if kind == "WarmupCosineLR":
        c.agree(
            params,
            "cos_min_ratio",
            "scheduler.params.cos_min_ratio",
            optim.min_lr_ratio,
            "optim.min_lr_ratio",
            same=_close,
        )
        c.agree(
            params,
            "warmup_min_ratio",
            "scheduler.params.warmup_min_ratio",
            0.0,
            "the trainer's linear warmup",
            same=_close,
        )
    known = {
        "warmup_num_steps",
        "warmup_max_lr",
        "warmup_min_lr",
        "warmup_type",
        "total_num_steps",
        "cos_min_ratio",
        "warmup_min_ratio",
        "last_batch_iteration",
    }
    for key in set(params) - known:
        c.fail(f"scheduler.params.{key}", "not something optim.* sets; remove it")
    section["params"] = params


def check_user_config(
    config: dict,
    path: str,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    grad_clip: float | None,
    precision: str,
    optim=None,
    max_steps: int | None = None,
) -> dict:
    """A copy of the user's DeepSpeed JSON with `"auto"` filled from trainer.* / optim.*, ready for DeepSpeed.

    `optim`: the run's OptimConfig (lr, beta1/2, eps, weight_decay, schedule, warmup_steps,
    min_lr_ratio); needed only when the JSON has an optimizer / scheduler section. Model-size autos
    in zero_optimization (bucket sizes) are filled later by `fill_model_autos`.
    """
    config = copy.deepcopy(config)
    c = _Checker(config, path)
    c.agree(
        config,
        "train_micro_batch_size_per_gpu",
        "train_micro_batch_size_per_gpu",
        micro_batch_size,
        "trainer.micro_batch_size",
    )
    c.agree(
        config,
        "gradient_accumulation_steps",
        "gradient_accumulation_steps",
        grad_accum_steps,
        "trainer.grad_accum_steps",
    )
    c.agree(
        config,
        "train_batch_size",
        "train_batch_size",
        micro_batch_size * grad_accum_steps * world_size,
        "trainer.micro_batch_size x trainer.grad_accum_steps x world size",
    )
    c.agree(
        config,
        "gradient_clipping",
        "gradient_clipping",
        float(grad_clip) if grad_clip else 0.0,
        "optim.grad_clip",
        same=_close,
    )
    for section in ("bf16", "fp16", "amp"):
        if section in config and not isinstance(config[section], dict):
            c.fail(section, 'must be an object like {"enabled": "auto"}')
    bf16 = config.setdefault("bf16", {})
    c.agree(
        bf16,
        "enabled",
        "bf16.enabled",
        precision == "bf16",
        f"trainer.precision={precision}",
        same=lambda a, b: bool(a) == b,
    )
    for section in ("fp16", "amp"):
        enabled = config.get(section, {}).get("enabled", False)
        if enabled == AUTO:
            config[section]["enabled"] = False
        elif enabled:
            c.fail(
                f"{section}.enabled",
                "true, but the trainer runs bf16 or fp32 (trainer.precision); float16 "
                "needs loss scaling the trainer does not do -- use trainer.precision=bf16",
            )
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in (1, 2, 3):
        c.fail(
            "zero_optimization.stage",
            f"{(zero or {}).get('stage') if isinstance(zero, dict) else None!r}: "
            f"strategy=deepspeed runs ZeRO stage 1, 2 or 3",
        )
    offload = zero.get("offload_param")
    if isinstance(offload, dict) and zero["stage"] != 3 and (offload.get("device") or "none") != "none":
        c.fail("zero_optimization.offload_param", "needs zero_optimization.stage 3")
    for name, check in (
        ("optimizer", lambda s: _check_optimizer(c, s, optim)),
        ("scheduler", lambda s: _check_scheduler(c, s, optim, max_steps)),
    ):
        if name in config:
            if optim is None:
                c.fail(name, "cannot be checked without optim.*")
            check(dict(config[name]))
            # Honoured through optim.*; DeepSpeed gets our AdamW + LambdaLR as client objects.
            del config[name]
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


def fill_model_autos(config: dict, hidden_size: int, path: str) -> dict:
    """HF's model-size defaults for `"auto"` ZeRO bucket sizes; any other `"auto"` left is an error."""
    zero = config.get("zero_optimization", {})
    sizes = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in sizes.items():
        if zero.get(key) == AUTO:
            zero[key] = value
    left = list(_autos(config))
    if left:
        raise ConfigError(f'strategy.config_file: {path}: {left[0]}: "auto" is not a value the trainer can fill')
    return config


def _autos(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _autos(value, f"{prefix}{key}.")
    elif node == AUTO:
        yield prefix[:-1]
