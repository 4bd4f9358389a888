"""Under DeepSpeed a non-finite step changes no weight and no optimizer state, and the trainer counts it.

In-process, one rank (DeepSpeed's CPU accelerator, a one-rank gloo group): the real Trainer.train_step
with trainer.grad_accum_steps=2, a NaN/Inf injected into one step's loss. The snapshot covers the
fp32 master partitions ZeRO steps, the AdamW state over them (exp_avg, exp_avg_sq, step) and the
module's own parameters (ZeRO-3: this rank's partition).
"""

from __future__ import annotations

import pytest
import torch

from persimmon_train.parallel.deepspeed import DeepSpeedStrategy
from persimmon_train.parallel.ds_config import build_ds_config
from persimmon_train.training.config import RunConfig
from persimmon_train.training.optim import build_optimizer, build_scheduler
from persimmon_train.training.trackers import NullTracker
from persimmon_train.training.trainer import Trainer
from tests.helpers import ListLoader, causal_rows, tiny_model

MICRO, ACCUM = 2, 2
pytestmark = pytest.mark.slow  # ~5 s a case (DeepSpeed engine start-up)


@pytest.fixture(scope="module")
def one_rank():
    # One process group for the module (DeepSpeed caches its groups: a second group after a
    # destroy would not be seen); torn down at the end so later tests start clean.
    with pytest.MonkeyPatch.context() as mp:
        for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
            mp.delenv(key, raising=False)
        mp.setenv("LOCAL_RANK", "0")
        # ZeRO-3 swaps torch.nn.functional.linear for its own (process-wide): put it back afterwards.
        mp.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
        strategies = []
        yield strategies
        if strategies:
            strategies[0].close()


def _trainer(strategies, *, stage, precision, grad_clip, extra=None):
    cfg = RunConfig()
    cfg.trainer.max_steps, cfg.trainer.micro_batch_size, cfg.trainer.grad_accum_steps = 10, MICRO, ACCUM
    cfg.trainer.precision, cfg.trainer.progress_bar = precision, False
    cfg.optim.lr, cfg.optim.grad_clip, cfg.optim.schedule = 1e-2, grad_clip, "constant"
    zero = {"zero_optimization": {"stage3_param_persistence_threshold": 0, **(extra or {})}}
    strategy = DeepSpeedStrategy(
        precision=precision,
        device="cpu",
        make_config=lambda world, prec: build_ds_config(
            stage=stage,
            micro_batch_size=MICRO,
            grad_accum_steps=ACCUM,
            world_size=world,
            grad_clip=grad_clip,
            precision=prec,
            extra=zero,
        ),
    )
    strategies.append(strategy)
    model, optimizer = strategy.wrap(tiny_model(), lambda m: build_optimizer(m, cfg.optim))
    return Trainer(
        cfg,
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.optim, 10),
        train_loader=ListLoader(causal_rows(16), MICRO),
        eval_loader=None,
        tracker=NullTracker(),
        metrics_file=None,
        output_dir="unused",
        id2label=None,
    )


def _snapshot(engine) -> list[torch.Tensor]:
    inner = engine.optimizer.optimizer  # the torch AdamW ZeRO steps over its fp32 partitions
    out = [p.detach().clone() for group in inner.param_groups for p in group["params"]]
    for state in inner.state.values():
        out += [v.detach().clone() if torch.is_tensor(v) else torch.tensor(float(v)) for _, v in sorted(state.items())]
    out += [getattr(p, "ds_tensor", p).detach().float().clone() for p in engine.module.parameters()]
    return out


def _step(trainer, poison=None):
    batches = [next(trainer._batches) for _ in range(ACCUM)]
    if poison is None:
        return trainer.train_step(batches)
    module = trainer.strategy.engine.module
    original = module.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.loss = poison(out.loss)
        return out

    module.forward = forward
    try:
        return trainer.train_step(batches)
    finally:
        del module.forward


# loss x NaN: NaN gradients. loss + Inf: an Inf loss whose gradients stay finite -- the engine would
# apply that step unless the strategy poisons the gradients itself.
POISONS = {"nan": lambda loss: loss * float("nan"), "inf_constant": lambda loss: loss + float("inf")}


@pytest.mark.parametrize(
    "stage,precision,grad_clip,extra,poison",
    [
        (1, "fp32", 1.0, None, "inf_constant"),
        (2, "bf16", 1.0, None, "inf_constant"),
        # No clipping and no norm: ZeRO-1/2 in fp32 would not look at the gradients at all.
        (2, "fp32", None, {"compute_grad_norm": False}, "nan"),
        (3, "fp32", 1.0, None, "inf_constant"),
        (3, "bf16", 1.0, None, "nan"),
    ],
)
def test_nonfinite_step_changes_nothing_and_is_counted(one_rank, stage, precision, grad_clip, extra, poison):
    trainer = _trainer(one_rank, stage=stage, precision=precision, grad_clip=grad_clip, extra=extra)
    trainer._batches = iter(trainer.train_loader)
    assert all(_step(trainer)["finite"] for _ in range(2))
    before = _snapshot(trainer.strategy.engine)

    bad = _step(trainer, POISONS[poison])
    assert bad["finite"] is False
    assert trainer.state.skipped_steps == 1 and trainer.state.consecutive_nonfinite == 1
    after = _snapshot(trainer.strategy.engine)
    assert len(after) == len(before)
    for a, b in zip(before, after):
        assert torch.equal(a, b), "a non-finite step changed weights or optimizer state"

    good = _step(trainer)  # training goes on from the untouched state, and the snapshot would see it
    assert good["finite"] and trainer.state.consecutive_nonfinite == 0 and trainer.state.skipped_steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(after, _snapshot(trainer.strategy.engine)))
    assert all(torch.isfinite(t).all() for t in _snapshot(trainer.strategy.engine))
