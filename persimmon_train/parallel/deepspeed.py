"""`strategy=deepspeed`: DeepSpeed ZeRO stage 1, 2 or 3 behind the trainer's strategy interface.

The DeepSpeed config is generated from our keys (strategy.stage, offload_*, trainer.micro_batch_size,
trainer.grad_accum_steps, optim.grad_clip, trainer.precision) -- or taken as-is from
`strategy.config_file=ds.json`, with `"auto"` filled and the keys the trainer also decides checked
(parallel/ds_config.py).

How it meets the trainer's contract:
- The trainer divides each micro-batch's summed loss by the global target count, so gradients
  must be SUMMED over ranks; DeepSpeed averages over the data-parallel ranks, so `backward`
  multiplies the loss by world_size (and passes scale_wrt_gas=False: the global count already
  covers the accumulation steps).
- DeepSpeed owns clipping (`gradient_clipping`) and the optimizer step; `clip_and_step` is one
  `engine.step()` at the accumulation boundary, returning the engine's pre-clip global norm.
- The optimizer is ours (AdamW over the trainer's parameter groups) and so is the LR schedule:
  ZeRO shares the client optimizer's param_groups, so the trainer's LambdaLR drives its lr.
- The trainer marks the accumulation boundary (`set_gradient_accumulation_boundary`), so
  trainer.grad_accum_steps > 1 steps once per optimizer step.
- A NaN/Inf loss or gradient skips the step inside ZeRO (weights and optimizer state untouched);
  `clip_and_step` reports whether the engine applied it.

Checkpoints: `engine.save_checkpoint(step_N, tag="deepspeed")`, every rank writing its own
partition (frozen LoRA bases excluded). A resume with the same world size and stage is DeepSpeed's
own `engine.load_checkpoint`; at another world size or stage each rank takes its new partition from
the partitions the checkpoint holds (parallel/zero_reshard.py). `storage.ZeroCheckpoint` reads them in one process.

Weights from model.path: ZeRO-3 builds the model on the meta device and fills it module by module,
each rank keeping only its partitions (parallel/zero3_load.py); ZeRO-1/2 hold full parameters on
every rank anyway, so every rank loads the model (from_pretrained) before ZeRO shards the rest.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn

from persimmon_train.errors import CheckpointError, WeightsError
from persimmon_train.parallel.distributed import DistributedStrategy
from persimmon_train.parallel.ds_config import build_ds_config, check_user_config, fill_model_autos, read_user_config
from persimmon_train.parallel.frozen_weights import hold_frozen_for
from persimmon_train.parallel.single import resolve_precision
from persimmon_train.storage.checkpoints import DEEPSPEED_TAG as TAG
from persimmon_train.storage.checkpoints import read_manifest
from persimmon_train.storage.zero_checkpoint import check_pickled_types

log = logging.getLogger("persimmon_train")


class DeepSpeedStrategy(DistributedStrategy):
    name = "deepspeed"

    def __init__(
        self,
        *,
        ds_config: dict | None = None,
        precision: str = "bf16",
        device: str = "auto",
        backend: str = "auto",
        timeout_minutes: float = 30.0,
        config_source: str = "strategy.*",
        make_config=None,
        model_path: str | None = None,
        seed: int = 0,
    ):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if backend == "auto" and not torch.cuda.is_available():
            backend = get_accelerator().communication_backend_name()
            backend = "gloo" if backend == "ccl" else backend
        self._join(device, backend, timeout_minutes)
        # Started with plain `python` (a one-rank group, no launcher): DeepSpeed insists on LOCAL_RANK.
        os.environ.setdefault("LOCAL_RANK", str(self.local_rank))
        deepspeed.init_distributed(dist_backend=self.backend, auto_mpi_discovery=False)
        self._unlink_shm_workspace()
        self.precision = resolve_precision(precision, self._device)
        self.ds_config = ds_config if ds_config is not None else make_config(self.world_size, self.precision)
        self.config_source = config_source
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        self.engine = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.model_path, self.seed = model_path, seed
        self.load_report: dict = {}

    def _unlink_shm_workspace(self) -> None:
        """Remove the name of DeepSpeed's CPU all-reduce workspace, keeping the memory mapped.

        On the CPU accelerator with every rank on one node, DeepSpeed's shm op gives each rank a
        66 MB workspace, /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, and never
        unlinks it: every run left ranks x 66 MB of RAM behind until reboot (a day of tests here:
        20 GB, and the machine ran out of memory). init_distributed returns on a rank once it has
        mapped every other rank's workspace, so after a barrier the names can go; the mappings
        live until the processes exit, killed or not.
        """
        # DeepSpeed's own condition (shm_interface.cpp), the same on every rank, so all or none
        # reach the barrier: CPU ranks that are all on this node (the launcher sets LOCAL_SIZE).
        if self._device.type != "cpu" or os.environ.get("LOCAL_SIZE") != str(self.world_size):
            return
        self.barrier()
        name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
            os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), self.rank
        )
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except FileNotFoundError:  # no shm op (not built or not supported): nothing was created
            pass
        except OSError as err:  # never fatal: the cost is memory, not correctness
            log.warning("could not remove DeepSpeed's shared-memory workspace /dev/shm/%s: %s", name, err)

    # With model.path the model arrives built on the meta device. ZeRO-3: each rank keeps only its
    # partitions (parallel/zero3_load.py). ZeRO-1/2 keep full parameters on every rank: the loader
    # single and FSDP use fills them (the same seeded init for LoRA adapters and new heads).
    loads_sharded_weights = True

    @classmethod
    def from_run_config(cls, cfg):
        s, t = cfg.strategy, cfg.trainer
        common = dict(
            precision=t.precision,
            device=s.device,
            backend=s.backend,
            timeout_minutes=s.timeout_minutes,
            model_path=cfg.model.path,
            seed=t.seed,
        )
        keys = dict(
            micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps, grad_clip=cfg.optim.grad_clip
        )
        if s.config_file:
            # Read before joining the process group: a bad file fails before anything starts.
            raw = read_user_config(s.config_file)

            def make_user(world_size, precision):
                return check_user_config(
                    raw,
                    s.config_file,
                    world_size=world_size,
                    precision=precision,
                    optim=cfg.optim,
                    max_steps=t.max_steps,
                    **keys,
                )

            return cls(make_config=make_user, config_source=s.config_file, **common)

        def make(world_size, precision):
            return build_ds_config(
                stage=s.stage,
                world_size=world_size,
                precision=precision,
                offload_optimizer=s.offload_optimizer,
                offload_param=s.offload_param,
                nvme_path=s.nvme_path,
                extra=dict(s.extra) if s.extra else None,
                **keys,
            )

        return cls(make_config=make, **common)

    @property
    def grad_accum_steps(self) -> int:
        return int(self.ds_config["gradient_accumulation_steps"])

    # ------------------------------------------------------------------ set-up
    def wrap(self, model, make_optimizer):
        import deepspeed

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = getattr(getattr(base, "config", None), "hidden_size", None)
        if hidden:
            fill_model_autos(self.ds_config, int(hidden), self.config_source)
        log.info(
            "deepspeed: ZeRO stage %d, config from %s: %s",
            self.stage,
            self.config_source,
            json.dumps(self.ds_config, sort_keys=True),
        )
        # Frozen matrices never exist in float32 (bf16 runs); DeepSpeed then casts the rest of the
        # module to bf16 itself and keeps the trainable float32 masters in its optimizer.
        hold_frozen_for(model, self.precision)
        if any(p.is_meta for p in model.parameters()):
            if not self.model_path:
                raise WeightsError("strategy=deepspeed: the model is on the meta device but model.path is not set")
            if self.stage == 3:
                from persimmon_train.parallel.zero3_load import materialize_zero3

                self.load_report = materialize_zero3(
                    model, self.model_path, self.ds_config, seed=self.seed, is_main=self.is_main, device=self._device
                )
            else:
                from persimmon_train.parallel.sharded_load import load_into_meta_model

                self.load_report = load_into_meta_model(model, self.model_path, device=self._device, seed=self.seed)
        if make_optimizer is None and self.stage < 3:
            # Evaluation: ZeRO-1/2 engines need a client optimizer (ZeRO-3 runs without one); this
            # AdamW allocates no state until a step, which evaluation never takes.
            make_optimizer = lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])  # noqa: E731
        optimizer = make_optimizer(model) if make_optimizer else None
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        # A NaN/Inf gradient must skip the step on every stage and precision: ZeRO-1/2 check only
        # when asked (bf16's default, not fp32's); ZeRO-3 treats a non-finite norm as overflow.
        if hasattr(self.engine.optimizer, "check_grad_overflow"):
            self.engine.optimizer.check_grad_overflow = True
        # ZeRO keeps the client optimizer's param_groups: an LR scheduler over it drives ZeRO's lr.
        self.optimizer = optimizer
        return self.engine, self.optimizer

    def unwrapped_model(self) -> nn.Module:
        return self.engine.module

    # ------------------------------------------------------------------ the step
    def accumulation_context(self, is_last_micro_batch: bool):
        # The trainer, not DeepSpeed's micro-step counter, decides where the accumulation boundary
        # is (it calls engine.step() once per optimizer step): ZeRO reduces gradients there.
        self.engine.set_gradient_accumulation_boundary(is_last_micro_batch)
        return super().accumulation_context(is_last_micro_batch)

    def backward(self, loss):
        # Sum over ranks (DeepSpeed averages); the loss is already normalised over accumulation.
        # A non-finite loss on any rank makes every gradient NaN (x NaN, not x world_size, with no
        # host sync), so ZeRO's overflow check -- all-reduced over ranks -- skips the whole step
        # even where the loss was Inf but the gradients happened to stay finite.
        scale = torch.where(torch.isfinite(loss.detach()), float(self.world_size), float("nan"))
        self.engine.backward(loss * scale, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm):
        raise NotImplementedError("DeepSpeed clips inside engine.step(); the trainer calls clip_and_step")

    def optimizer_step(self):
        raise NotImplementedError("DeepSpeed steps in clip_and_step")

    def clip_and_step(self, max_norm, loss_is_finite):
        # One engine.step() at the accumulation boundary: clip (gradient_clipping), step, zero grads.
        # On NaN/Inf gradients ZeRO discards the step (no weight, no optimizer state changes) and
        # zeroes the gradients; was_step_applied() tells the trainer the truth.
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(
                "deepspeed: optimizer step requested before the accumulation boundary "
                f"(gradient_accumulation_steps={self.grad_accum_steps} must equal "
                f"trainer.grad_accum_steps)"
            )
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if norm is None else float(norm))
        return norm, bool(self.engine.was_step_applied())

    def zero_grad(self):
        pass  # engine.step() zeroes the gradients at the boundary

    # ------------------------------------------------------------------ state
    def save_state(self, directory):
        # Collective: every rank writes its own partition of weights and optimizer state.
        self.engine.save_checkpoint(directory, tag=TAG, save_latest=False, exclude_frozen_parameters=True)

    def load_state(self, directory):
        if not os.path.isdir(os.path.join(directory, TAG)):
            raise CheckpointError(
                f"{directory}: no {TAG}/ folder; not a strategy=deepspeed checkpoint (see its manifest.json)"
            )
        written = read_manifest(directory).get("strategy") or {}
        if (written.get("world_size"), written.get("stage")) != (self.world_size, self.stage):
            # DeepSpeed loads its partitions only into the layout that wrote them: reshard ourselves.
            from persimmon_train.parallel.zero_reshard import load_resharded

            load_resharded(self.engine, os.path.join(directory, TAG))
            return
        check_pickled_types(os.path.join(directory, TAG))  # DeepSpeed's loader trusts every pickle
        frozen = any(not p.requires_grad for p in self.engine.module.parameters())
        path, _ = self.engine.load_checkpoint(
            directory,
            tag=TAG,
            load_module_strict=not frozen,
            load_optimizer_states=self.optimizer is not None,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise CheckpointError(f"{directory}/{TAG}: DeepSpeed could not load this checkpoint")

    def checkpoint_info(self) -> dict:
        return {**super().checkpoint_info(), "stage": self.stage, "format": "deepspeed", "tag": TAG}
