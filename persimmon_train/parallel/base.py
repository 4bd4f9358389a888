"""The strategy interface: everything the trainer needs from "how the model is placed".

The trainer never touches process groups, sharding or wrappers directly; it asks the strategy.
`single` (one process, one device) is the reference; FSDP2 and DeepSpeed implement the same
methods so the recipes and the loop do not change when a run is sharded.

Gradient contract (what keeps the update independent of how the global batch is split): the
trainer divides each micro-batch's *summed* loss by the number of target items in the whole global
batch (`reduce_sum` of the per-rank counts), so after `backward` on every micro-batch of every rank
the correct gradient is the SUM of the per-rank gradients. A data-parallel strategy must therefore
sum, not average, gradients across ranks (e.g. scale the loss by world_size before backward, or
set the gradient divide factor to 1).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


def available_device(requested: str, index: int | None = None) -> torch.device:
    """`strategy.device` as a torch.device this machine has: cpu, or a CUDA device that exists.

    `index`: the device for plain `cuda` (a rank's LOCAL_RANK); None leaves it to torch. Anything
    else (`tpu`, `cuda:3` on a 2-GPU node, `cuda` without a GPU) is a ConfigError naming the key.
    """
    from persimmon_train.errors import ConfigError

    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"strategy.device: {requested!r} is not one of auto, cpu, cuda, cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"strategy.device: {requested!r} is not one of auto, cpu, cuda, cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.index is None and index is not None:
        device = torch.device("cuda", index)
    if count == 0:
        raise ConfigError(f"strategy.device: {requested!r} but this machine has no CUDA GPU (use cpu or auto)")
    if device.index is not None and device.index >= count:
        raise ConfigError(f"strategy.device: {device} but this machine has {count} CUDA GPU(s) (cuda:0..{count - 1})")
    return device


class Strategy(ABC):
    """One way of running the model: placement, precision, backward, optimizer step, state."""

    name: str = "base"
    # True: the strategy can take a model built on the meta device and load each rank's share of
    # model.path itself (run.py then builds the model on meta when model.path is set).
    loads_sharded_weights: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @classmethod
    def from_run_config(cls, cfg) -> Strategy:
        """Build from a RunConfig (strategy.*, trainer.*, optim.*, model.path)."""
        return cls(precision=cfg.trainer.precision, device=cfg.strategy.device)

    # ------------------------------------------------------------------ set-up
    @abstractmethod
    def wrap(
        self, model: nn.Module, make_optimizer: OptimizerFactory | None
    ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """Place/shard `model`, then build its optimizer with `make_optimizer(model)`.

        A factory rather than an optimizer because sharding strategies (FSDP2) must build the
        optimizer over the sharded parameters, and DeepSpeed wraps the optimizer itself.
        `make_optimizer=None` (evaluation): no optimizer; `load_state` then restores weights only.
        Returns (model to call forward on, optimizer to hand to the LR scheduler).
        """

    @abstractmethod
    def unwrapped_model(self) -> nn.Module:
        """The user-level module (peft model or plain Persimmon), without strategy wrappers."""

    # ------------------------------------------------------------------ the step
    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes (bf16 autocast over float32 master weights, or nothing)."""
        return contextlib.nullcontext()

    def accumulation_context(self, is_last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Wrap forward+backward of one micro-batch (lets DP strategies skip grad sync until the last)."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Clip the global gradient norm to `max_norm` (None/<=0: only measure); return the norm before clipping."""

    @abstractmethod
    def optimizer_step(self) -> None: ...

    def clip_and_step(self, max_norm: float | None, loss_is_finite: bool) -> tuple[torch.Tensor, bool]:
        """Clip, then step unless the loss or the gradient norm is NaN/Inf.

        Returns (grad norm before clipping, whether the optimizer stepped). Engines that own
        clipping and the step (DeepSpeed) override this as one call.
        """
        grad_norm = self.clip_grad_norm(max_norm)
        finite = loss_is_finite and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer_step()
        return grad_norm, finite

    @abstractmethod
    def zero_grad(self) -> None: ...

    # ------------------------------------------------------------------ collectives
    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (identity on one process)."""
        return value

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (identity on one process)."""
        return obj

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order (eval predictions for classification metrics)."""
        return [obj]

    # ------------------------------------------------------------------ state
    @abstractmethod
    def save_state(self, directory: str) -> None:
        """Write model (trainable weights) + optimizer state into `directory` (collective)."""

    @abstractmethod
    def load_state(self, directory: str) -> None:
        """Restore what `save_state` wrote, exactly (collective)."""

    def checkpoint_info(self) -> dict:
        """What a checkpoint's manifest records about the strategy (readers pick the weights reader by name)."""
        return {"name": self.name, "world_size": self.world_size}

    def close(self) -> None:
        """Tear down process groups etc."""
