"""`strategy=single`: one process, one device (CPU or one GPU). The reference strategy."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from persimmon_train.errors import CheckpointError, WeightsError, first_line
from persimmon_train.parallel.base import OptimizerFactory, Strategy, available_device
from persimmon_train.parallel.frozen_weights import hold_frozen_for
from persimmon_train.parallel.nf4 import check_nf4_precision, quantize_frozen_linears
from persimmon_train.parallel.sharded_load import load_into_meta_model
from persimmon_train.storage.checkpoints import SINGLE_MODEL_FILE, SINGLE_OPTIMIZER_FILE


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return available_device(requested)


def cpu_flags() -> set[str] | None:
    """The CPU feature flags of /proc/cpuinfo (Linux); None where there is no such file."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def cpu_bf16_is_fast(flags: set[str] | None) -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU: only with AMX (`amx_bf16`).

    AVX512-BF16 alone is not enough: measured on such a CPU (no AMX), bf16 matmul ran at 161
    GFLOP/s vs 307 for fp32, and the embedded default 60 steps took 12.0 s in bf16 vs 9.6 s in
    fp32. AMX tiles run bf16 several times faster than fp32 FMA. Without /proc/cpuinfo, ask torch.
    """
    if flags is None:
        probe = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
        return bool(probe()) if probe else False
    return "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where bf16 is faster than fp32 (CUDA with bf16; CPUs with AMX), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_bf16_is_fast(cpu_flags()) else "fp32"


class SingleDeviceStrategy(Strategy):
    name = "single"
    # With model.path the model arrives built on the meta device and is filled here, each tensor
    # read in its final dtype (parallel/sharded_load.py, the loader FSDP and ZeRO-3 use too).
    loads_sharded_weights = True

    def __init__(
        self,
        precision: str = "bf16",
        device: str = "auto",
        model_path: str | None = None,
        seed: int = 0,
        quantize_base: str = "none",
    ):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            from persimmon_train.errors import ConfigError

            # Every rank would train the same model and write the same files.
            raise ConfigError(
                f"strategy: single was launched with WORLD_SIZE={world}; use strategy=fsdp or "
                f"strategy=deepspeed under torchrun / deepspeed"
            )
        self._device = pick_device(device)
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self.precision = resolve_precision(precision, self._device)
        check_nf4_precision(quantize_base, self.precision)
        self.quantize_base = quantize_base
        self.model_path = model_path
        self.seed = seed
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.load_report: dict = {}

    @classmethod
    def from_run_config(cls, cfg):
        return cls(
            precision=cfg.trainer.precision,
            device=cfg.strategy.device,
            model_path=cfg.model.path,
            seed=cfg.trainer.seed,
            quantize_base=cfg.peft.quantize_base,
        )

    @property
    def device(self) -> torch.device:
        return self._device

    def wrap(self, model, make_optimizer: OptimizerFactory):
        # Trainable weights stay float32 masters; frozen matrices are held in bf16 for a bf16 run
        # (parallel/frozen_weights.py); bf16 compute happens inside autocast.
        hold_frozen_for(model, self.precision)
        if any(p.is_meta for p in model.parameters()):
            if not self.model_path:
                raise WeightsError("strategy=single: the model is on the meta device but model.path is not set")
            if self.quantize_base == "nf4":  # NF4 placeholders: loading quantizes one tensor at a time
                quantize_frozen_linears(model)
            self.load_report = load_into_meta_model(model, self.model_path, device=self._device, seed=self.seed)
            self.model = model
        else:
            self.model = model.to(self._device)
            if self.quantize_base == "nf4":
                quantize_frozen_linears(self.model)
        self.optimizer = make_optimizer(self.model) if make_optimizer else None
        return self.model, self.optimizer

    def unwrapped_model(self) -> nn.Module:
        return self.model

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self._device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm(self, max_norm):
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self._device)
        if max_norm is None or max_norm <= 0:
            return torch.nn.utils.get_total_norm([p.grad for p in params])
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def optimizer_step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ state
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        # Only what training changes: the full model for full fine-tuning, the adapter (+ heads)
        # for LoRA. Frozen weights come back from model.path / the seeded init on resume.
        return {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_state(self, directory):
        from persimmon_train.storage.files import disk_errors
        from persimmon_train.storage.safetensors_io import write_safetensors_file

        weights = {name: tensor.cpu() for name, tensor in self._trainable_state().items()}
        write_safetensors_file(os.path.join(directory, SINGLE_MODEL_FILE), weights)
        path = os.path.join(directory, SINGLE_OPTIMIZER_FILE)
        with disk_errors(path):
            torch.save(self.optimizer.state_dict(), path)

    def load_state(self, directory):
        from persimmon_train.storage import iter_safetensors_file

        path = os.path.join(directory, SINGLE_MODEL_FILE)
        weights = dict(iter_safetensors_file(path))
        expected = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: does not match the model being trained (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}); was it written with another model/peft config?"
            )
        params = dict(self.model.named_parameters())
        for name, tensor in weights.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise CheckpointError(
                    f"{path}: tensor {name} has shape {list(tensor.shape)} but the model being "
                    f"trained has {list(params[name].shape)}"
                )
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        if self.optimizer is None:  # evaluation
            return
        opt_path = os.path.join(directory, SINGLE_OPTIMIZER_FILE)
        try:
            # weights_only: never unpickle arbitrary objects from a checkpoint folder.
            state = torch.load(opt_path, map_location=self._device, weights_only=True)
            self.optimizer.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - torch raises several types for a damaged/foreign file
            reason = first_line(exc, 200)
            raise CheckpointError(f"{opt_path}: cannot restore the optimizer ({reason})") from None
