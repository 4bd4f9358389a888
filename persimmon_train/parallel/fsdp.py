"""`strategy=fsdp`: PyTorch FSDP2 (`fully_shard`), one data-parallel rank per process.

How the model is sharded (the whole of it is `FSDPStrategy.parallelize`):
- `fully_shard` on every decoder layer, then on the root (embeddings, final norm, head and the
  peft wrapper): a layer's parameters are all-gathered just before its forward/backward and freed
  after (reshard-after-forward, `strategy.reshard_after_forward`).
- Mixed precision: with trainer.precision=bf16 the gathered parameters are bf16 for compute and
  gradients are reduced in float32 onto float32 master shards (MixedPrecisionPolicy); fp32 runs
  without a policy.
- `strategy.cpu_offload`: shards, gradients and optimizer state live in host memory.
- `strategy.replicate_degree=R > 1`: HSDP on a 2-D mesh (R replicas x world/R shards), e.g. one
  replica per node so parameter all-gathers stay on the node's fast links.
- Activation checkpointing and LoRA are applied to the plain model before sharding (names
  unchanged, frozen base and trainable adapters share FSDP groups; FSDP2 allows that).
- Gradients are SUMMED across ranks (divide factor 1): the trainer already divides each loss by
  the global number of target tokens (see parallel/base.py).

Big models: with model.path the model is built on the meta device, sharded, and each rank reads
only its slice of every tensor from the safetensors files (parallel/sharded_load.py). Without
model.path (random init, small test models) every rank builds the full model from the same seed,
as `single` does, and `fully_shard` keeps each rank's slice: the same weights as a single process.

Checkpoints: torch.distributed.checkpoint (DCP) under `step_N/dcp/`; every rank writes its own
shards of the trainable weights and optimizer state, and a load reshards to any world size
(including one process: `python recipes/finetune.py strategy=fsdp resume=...`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from persimmon_train.errors import CheckpointError, WeightsError, first_line
from persimmon_train.parallel.distributed import DistributedStrategy, GroupComm, launched_world, pick_device
from persimmon_train.parallel.frozen_weights import hold_frozen_for
from persimmon_train.parallel.nf4 import check_nf4_precision, quantize_frozen_linears
from persimmon_train.parallel.single import resolve_precision
from persimmon_train.storage.checkpoints import DCP_DIR
from persimmon_train.storage.checkpoints import DCP_MODEL_KEY as MODEL_KEY
from persimmon_train.storage.checkpoints import DCP_OPTIM_KEY as OPTIM_KEY


class FSDPStrategy(DistributedStrategy):
    name = "fsdp"
    loads_sharded_weights = True

    def __init__(
        self,
        precision: str = "bf16",
        device: str = "auto",
        backend: str = "auto",
        timeout_minutes: float = 30.0,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        replicate_degree: int = 1,
        model_path: str | None = None,
        seed: int = 0,
        quantize_base: str = "none",
    ):
        if cpu_offload and pick_device(device, launched_world()[2]).type == "cpu":
            from persimmon_train.errors import ConfigError

            # FSDP's CPUOffloadPolicy moves shards between host memory and an accelerator; with the
            # model already on the CPU there is nothing to offload (torch fails deep inside instead).
            # Checked before joining the process group: nothing has started yet.
            raise ConfigError(
                "strategy.cpu_offload: true needs an accelerator (this rank's device is cpu, where "
                "everything is already in host memory); set strategy.cpu_offload=false"
            )
        self._join(device, backend, timeout_minutes)
        self.precision = resolve_precision(precision, self._device)
        check_nf4_precision(quantize_base, self.precision)
        self.quantize_base = quantize_base
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.replicate_degree = replicate_degree
        self.model_path = model_path
        self.seed = seed
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.load_report: dict = {}
        if self.world_size % replicate_degree:
            from persimmon_train.errors import ConfigError

            raise ConfigError(
                f"strategy.replicate_degree: {replicate_degree} does not divide the world size {self.world_size}"
            )

    @classmethod
    def from_run_config(cls, cfg):
        s = cfg.strategy
        return cls(
            precision=cfg.trainer.precision,
            device=s.device,
            backend=s.backend,
            timeout_minutes=s.timeout_minutes,
            reshard_after_forward=s.reshard_after_forward,
            cpu_offload=s.cpu_offload,
            replicate_degree=s.replicate_degree,
            model_path=cfg.model.path,
            seed=cfg.trainer.seed,
            quantize_base=cfg.peft.quantize_base,
        )

    # ------------------------------------------------------------------ set-up
    def mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        if self.replicate_degree > 1:
            shape = (self.replicate_degree, self.world_size // self.replicate_degree)
            return init_device_mesh(self._device.type, shape, mesh_dim_names=("replicate", "shard"))
        return init_device_mesh(self._device.type, (self.world_size,), mesh_dim_names=("shard",))

    def parallelize(self, model: nn.Module) -> nn.Module:
        """fully_shard each decoder layer, then the root; gradients summed over ranks."""
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            FSDPModule,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        from persimmon_train.parallel.activation_checkpointing import decoder_layers

        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        common = dict(
            mesh=self.mesh(), mp_policy=mp, offload_policy=CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()
        )
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=self.reshard_after_forward, **common)
        fully_shard(model, **common)  # root: stays gathered between forward and backward (FSDP2 default)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # Sum, never average: plain SUM collectives (gloo has no PREMUL_SUM) and no division.
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        return model

    def wrap(self, model, make_optimizer):
        on_meta = any(p.is_meta for p in model.parameters())
        if on_meta and not self.model_path:
            raise WeightsError("strategy=fsdp: the model is on the meta device but model.path is not set")
        hold_frozen_for(model, self.precision)  # before sharding: FSDP shards what the model holds
        if not on_meta and self._device.type != "cpu":
            model = model.to(self._device)
        if self.quantize_base == "nf4":  # before sharding; on meta: placeholders filled while loading
            quantize_frozen_linears(model, shards=self.world_size // self.replicate_degree)
        self.model = self.parallelize(model)
        if on_meta:
            self._load_sharded(self.model)
        self.optimizer = make_optimizer(self.model) if make_optimizer else None
        return self.model, self.optimizer

    def _load_sharded(self, model: nn.Module) -> None:
        from persimmon_train.parallel.sharded_load import load_into_meta_model

        device = "cpu" if self.cpu_offload else self._device
        self.load_report = load_into_meta_model(model, self.model_path, device=device, seed=self.seed)

    def unwrapped_model(self) -> nn.Module:
        return self.model

    # ------------------------------------------------------------------ the step
    def backward(self, loss):
        loss.backward()

    def _grads(self):
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def clip_grad_norm(self, max_norm):
        grads = self._grads()
        if not grads:
            return torch.zeros((), device=self._device)
        if max_norm is None or max_norm <= 0:
            norm = torch.nn.utils.get_total_norm(grads)
        else:
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def optimizer_step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ state
    @staticmethod
    def _options(**kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Trainable weights only, like `single`: frozen LoRA bases come back from model.path / the seed.
        return StateDictOptions(ignore_frozen_params=True, **kw)

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        optimizers = () if self.optimizer is None else self.optimizer  # evaluation: weights only
        model_sd, optim_sd = get_state_dict(self.model, optimizers, options=self._options())
        return {MODEL_KEY: model_sd, OPTIM_KEY: optim_sd}

    def save_state(self, directory):
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=os.path.join(directory, DCP_DIR))

    # checkpoint.async_save: stage on the training thread, write in a background thread.
    def checkpoint_comm(self) -> GroupComm:
        if getattr(self, "_checkpoint_comm", None) is None:
            self._checkpoint_comm = GroupComm(self.rank, self.world_size)
        return self._checkpoint_comm

    def stage_state(self) -> dict:
        """A host-memory copy of what `save_state` writes, taken now (DCP's own stager, as
        `dcp.async_save` uses): training may change the parameters as soon as this returns."""
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        stager = DefaultStager(StagingOptions(False, False, False, False))
        try:
            return stager.stage(self._state())
        finally:
            stager.close()

    def save_staged(self, staged: dict, directory: str, comm: GroupComm) -> None:
        """Write a `stage_state` copy (any thread; DCP's collectives go over `comm`'s group)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(staged, checkpoint_id=os.path.join(directory, DCP_DIR), process_group=comm.group)

    def load_state(self, directory):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path = os.path.join(directory, DCP_DIR)
        if not os.path.isdir(path):
            raise CheckpointError(
                f"{directory}: no {DCP_DIR}/ folder; not a strategy=fsdp checkpoint (see its manifest.json)"
            )
        state = self._state()  # templates: this run's shapes and sharding; DCP reshards into them
        try:
            dcp.load(state, checkpoint_id=path)
        except Exception as exc:  # noqa: BLE001 - DCP raises CheckpointException wrapping per-rank errors
            raise CheckpointError(
                f"{path}: cannot load into the model being trained ({first_line(exc)}); "
                f"was it written with another model/peft config?"
            ) from None
        # Not strict: the checkpoint holds trainable weights only (a LoRA run's frozen base comes
        # from model.path or the seed), so the frozen keys are absent by design; every trainable key
        # was in the template that dcp.load filled above, which fails on any key the files lack.
        set_state_dict(
            self.model,
            () if self.optimizer is None else self.optimizer,
            model_state_dict=state[MODEL_KEY],
            optim_state_dict=state[OPTIM_KEY],
            options=self._options(strict=False),
        )

    def checkpoint_info(self) -> dict:
        return {**super().checkpoint_info(), "replicate_degree": self.replicate_degree, "format": "dcp"}
