"""`strategy=deepspeed`: DeepSpeed ZeRO stage 1, 2 or 3 behind the trainer's strategy interface.

The DeepSpeed config is generated from our keys (strategy.stage, offload_*, trainer.micro_batch_size,
trainer.grad_accum_steps, optim.grad_clip, trainer.precision) -- or taken as-is from
`strategy.config_file=ds.json`, after checking that the keys the trainer also decides agree.

How it meets the trainer's contract:
- The trainer divides each micro-batch's summed loss by the global target count, so gradients
  must be SUMMED over ranks; DeepSpeed averages over the data-parallel ranks, so `backward`
  multiplies the loss by world_size (and passes scale_wrt_gas=False: the global count already
  covers the accumulation steps).
- DeepSpeed owns clipping (`gradient_clipping`) and the optimizer step; `clip_and_step` is one
  `engine.step()` at the accumulation boundary, returning the engine's pre-clip global norm.
- The optimizer is ours (AdamW over the trainer's parameter groups) and so is the LR schedule:
  ZeRO shares the client optimizer's param_groups, so the trainer's LambdaLR drives its lr.

Checkpoints: `engine.save_checkpoint(step_N, tag="deepspeed")`, every rank writing its own
partition (frozen LoRA bases excluded); `iter_checkpoint_weights` rebuilds full tensors in one
process with DeepSpeed's zero_to_fp32 helpers.

Weights from model.path: every rank loads the model (from_pretrained) before ZeRO partitions
it; for models that do not fit host memory per rank use `strategy=fsdp` (meta-device sharded
loading), see docs/distributed.md.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Iterator

import torch
from torch import nn

from persimmon_train.errors import ConfigError, WeightsError
from persimmon_train.parallel.distributed import DistributedStrategy
from persimmon_train.parallel.single import resolve_precision

TAG = "deepspeed"


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_ds_config(*, stage: int, micro_batch_size: int, grad_accum_steps: int, world_size: int,
                    grad_clip: float | None, precision: str, offload_optimizer: str = "none",
                    offload_param: str = "none", nvme_path: str | None = None, extra: dict | None = None) -> dict:
    """The DeepSpeed JSON our keys mean."""
    zero: dict = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": offload_optimizer, "pin_memory": True,
                                     **({"nvme_path": nvme_path} if offload_optimizer == "nvme" else {})}
    if offload_param != "none":
        zero["offload_param"] = {"device": offload_param, "pin_memory": True,
                                 **({"nvme_path": nvme_path} if offload_param == "nvme" else {})}
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


def check_user_config(config: dict, path: str, *, micro_batch_size: int, grad_accum_steps: int, world_size: int,
                      grad_clip: float | None, precision: str) -> dict:
    """A user's DeepSpeed JSON, as-is, once the keys the trainer also decides agree with trainer.*."""
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(f"strategy.config_file: {path} has an '{section}' section; the optimizer and LR "
                              f"schedule come from optim.* -- remove it")
    expected = {"train_micro_batch_size_per_gpu": (micro_batch_size, "trainer.micro_batch_size"),
                "gradient_accumulation_steps": (grad_accum_steps, "trainer.grad_accum_steps"),
                "train_batch_size": (micro_batch_size * grad_accum_steps * world_size,
                                     "trainer.micro_batch_size x trainer.grad_accum_steps x world size")}
    config = copy.deepcopy(config)
    for key, (value, ours) in expected.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise ConfigError(f"strategy.config_file: {path} sets {key}={config[key]} but {ours} gives {value}")
    clip = float(grad_clip) if grad_clip else 0.0
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = clip
    elif float(config["gradient_clipping"]) != clip:
        raise ConfigError(f"strategy.config_file: {path} sets gradient_clipping={config['gradient_clipping']} "
                          f"but optim.grad_clip is {grad_clip}")
    for section, wanted in (("bf16", precision == "bf16"), ("fp16", False)):
        enabled = config.get(section, {}).get("enabled", False)
        if enabled == "auto":
            config.setdefault(section, {})["enabled"] = wanted
        elif bool(enabled) != wanted:
            raise ConfigError(f"strategy.config_file: {path} sets {section}.enabled={enabled} but "
                              f"trainer.precision is {precision}")
    if "stage" not in config.get("zero_optimization", {}):
        raise ConfigError(f"strategy.config_file: {path} has no zero_optimization.stage")
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


class DeepSpeedStrategy(DistributedStrategy):
    name = "deepspeed"

    def __init__(self, *, ds_config: dict | None = None, precision: str = "bf16", device: str = "auto",
                 backend: str = "auto", timeout_minutes: float = 30.0, config_source: str = "strategy.*",
                 make_config=None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if backend == "auto" and not torch.cuda.is_available():
            backend = get_accelerator().communication_backend_name()
            backend = "gloo" if backend == "ccl" else backend
        self._join(device, backend, timeout_minutes)
        deepspeed.init_distributed(dist_backend=self.backend, auto_mpi_discovery=False)
        self.precision = resolve_precision(precision, self._device)
        self.ds_config = ds_config if ds_config is not None else make_config(self.world_size, self.precision)
        self.config_source = config_source
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        self.engine = None
        self.optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def from_run_config(cls, cfg):
        s, t = cfg.strategy, cfg.trainer
        common = dict(precision=t.precision, device=s.device, backend=s.backend, timeout_minutes=s.timeout_minutes)
        keys = dict(micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps,
                    grad_clip=cfg.optim.grad_clip)
        if s.config_file:
            try:
                with open(s.config_file, encoding="utf-8") as f:
                    raw = json.load(f)
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"strategy.config_file: cannot read {s.config_file} ({exc})") from None
            strategy = cls(ds_config={}, config_source=s.config_file, **common)
            strategy.ds_config = check_user_config(raw, s.config_file, world_size=strategy.world_size,
                                                   precision=strategy.precision, **keys)
            strategy.stage = int(strategy.ds_config["zero_optimization"]["stage"])
            return strategy

        def make(world_size, precision):
            return build_ds_config(stage=s.stage, world_size=world_size, precision=precision,
                                   offload_optimizer=s.offload_optimizer, offload_param=s.offload_param,
                                   nvme_path=s.nvme_path, extra=dict(s.extra) if s.extra else None, **keys)

        return cls(make_config=make, **common)

    @property
    def grad_accum_steps(self) -> int:
        return int(self.ds_config["gradient_accumulation_steps"])

    # ------------------------------------------------------------------ set-up
    def wrap(self, model, make_optimizer):
        import deepspeed

        optimizer = make_optimizer(model)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                                    dist_init_required=False)
        # ZeRO keeps the client optimizer's param_groups: an LR scheduler over it drives ZeRO's lr.
        self.optimizer = optimizer
        return self.engine, self.optimizer

    def unwrapped_model(self) -> nn.Module:
        return self.engine.module

    # ------------------------------------------------------------------ the step
    def backward(self, loss):
        # Sum over ranks (DeepSpeed averages); the loss is already normalised over accumulation.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm):
        raise NotImplementedError("DeepSpeed clips inside engine.step(); the trainer calls clip_and_step")

    def optimizer_step(self):
        raise NotImplementedError("DeepSpeed steps in clip_and_step")

    def clip_and_step(self, max_norm, loss_is_finite):
        # One engine.step() at the accumulation boundary: clip (gradient_clipping), step, zero grads.
        # A NaN/Inf loss cannot be skipped here without desynchronising the engine's counters; the
        # trainer still counts it and stops after trainer.max_nonfinite_steps.
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("deepspeed: optimizer step requested before the accumulation boundary "
                               f"(gradient_accumulation_steps={self.grad_accum_steps} must equal trainer.grad_accum_steps)")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if norm is None else float(norm))
        return norm, loss_is_finite and bool(torch.isfinite(norm))

    def zero_grad(self):
        pass  # engine.step() zeroes the gradients at the boundary

    # ------------------------------------------------------------------ state
    def save_state(self, directory):
        # Collective: every rank writes its own partition of weights and optimizer state.
        self.engine.save_checkpoint(directory, tag=TAG, save_latest=False, exclude_frozen_parameters=True)

    def load_state(self, directory):
        if not os.path.isdir(os.path.join(directory, TAG)):
            raise WeightsError(f"{directory}: no {TAG}/ folder; not a strategy=deepspeed checkpoint "
                               f"(see its strategy.json)")
        frozen = any(not p.requires_grad for p in self.engine.module.parameters())
        path, _ = self.engine.load_checkpoint(directory, tag=TAG, load_module_strict=not frozen,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise WeightsError(f"{directory}/{TAG}: DeepSpeed could not load this checkpoint")

    def full_state_dict(self):
        module = self.engine.module
        if self.stage < 3:
            state = {k: v.detach().cpu() for k, v in module.state_dict().items()} if self.is_main else None
            return state
        import deepspeed

        # Gather one parameter at a time onto rank 0 (export only).
        state = {}
        params = dict(module.named_parameters())
        for name, tensor in module.state_dict(keep_vars=True).items():
            param = params.get(name)
            if param is not None and hasattr(param, "ds_id"):
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if self.is_main:
                        state[name] = param.detach().cpu().clone()
            elif self.is_main:
                state[name] = tensor.detach().cpu().clone()
        return state if self.is_main else None

    def checkpoint_info(self) -> dict:
        return {**super().checkpoint_info(), "stage": self.stage, "format": "deepspeed", "tag": TAG}


def iter_checkpoint_weights(checkpoint_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, FULL fp32 tensor) for each trainable weight of a deepspeed checkpoint, one at a time.

    One process, no torch.distributed: DeepSpeed's zero_to_fp32 merges the per-rank partitions
    (lazy mode: each tensor is assembled when asked for). Names are the unwrapped model's.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not os.path.isdir(os.path.join(checkpoint_dir, TAG)):
        raise WeightsError(f"{checkpoint_dir}: no {TAG}/ folder; not a strategy=deepspeed checkpoint")
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=TAG, exclude_frozen_parameters=True,
                                                     lazy_mode=True)
    for name in list(state):
        value = state.pop(name)
        yield name, value.contiguous() if hasattr(value, "contiguous") else value
