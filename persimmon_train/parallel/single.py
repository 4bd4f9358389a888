"""`strategy=single`: one process, one device (CPU or one GPU). The reference strategy."""

from __future__ import annotations

import contextlib
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from persimmon_train.errors import WeightsError
from persimmon_train.parallel.base import OptimizerFactory, Strategy

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where bf16 matmuls are native (CUDA bf16, CPU AMX / AVX512-BF16), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return "bf16" if native else "fp32"


class SingleDeviceStrategy(Strategy):
    name = "single"

    def __init__(self, precision: str = "bf16", device: str = "auto"):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            from persimmon_train.errors import ConfigError

            # Every rank would train the same model and write the same files.
            raise ConfigError(f"strategy: single was launched with WORLD_SIZE={world}; use strategy=fsdp or "
                              f"strategy=deepspeed under torchrun / deepspeed")
        self._device = pick_device(device)
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self.precision = resolve_precision(precision, self._device)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def device(self) -> torch.device:
        return self._device

    def wrap(self, model, make_optimizer: OptimizerFactory):
        # Master weights stay float32; bf16 happens only inside autocast.
        self.model = model.to(self._device)
        self.optimizer = make_optimizer(self.model)
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
        save_file(self._trainable_state(), os.path.join(directory, MODEL_FILE))
        torch.save(self.optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))

    def load_state(self, directory):
        path = os.path.join(directory, MODEL_FILE)
        try:
            weights = load_file(path, device=str(self._device))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise WeightsError(f"{path}: cannot read checkpoint weights ({exc})") from None
        expected = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            raise WeightsError(
                f"{path}: does not match the model being trained (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}); was it written with another model/peft config?")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        opt_path = os.path.join(directory, OPTIMIZER_FILE)
        # weights_only: never unpickle arbitrary objects from a checkpoint folder.
        state = torch.load(opt_path, map_location=self._device, weights_only=True)
        self.optimizer.load_state_dict(state)

    def full_state_dict(self):
        return {k: v.detach() for k, v in self.model.state_dict().items()}


def iter_checkpoint_weights(checkpoint_dir: str):
    """(name, full tensor) for the trainable weights of a `single` checkpoint, one at a time.

    Names are the unwrapped model's (peft's `base_model.model.` prefixes under LoRA).
    """
    from safetensors import safe_open

    path = os.path.join(checkpoint_dir, MODEL_FILE)
    if not os.path.isfile(path):
        raise WeightsError(f"{checkpoint_dir}: no {MODEL_FILE}; not a strategy=single checkpoint")
    with safe_open(path, framework="pt", device="cpu") as handle:
        for name in handle.keys():
            yield name, handle.get_tensor(name)
