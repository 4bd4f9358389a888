"""The training loop: one optimizer step at a time, with eval, checkpoints and tracking.

Per optimizer step the trainer takes `grad_accum_steps` micro-batches, counts the target items
in all of them (and, through the strategy, on all ranks), and gives that count to the model as
`num_items_in_batch`, so each micro-batch's loss is its summed loss / the global count and the
accumulated gradient is the gradient of the global mean -- independent of how the global batch
is split into micro-batches or ranks.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass, field

import torch

from persimmon_train.errors import PersimmonTrainError
from persimmon_train.training import checkpointing
from persimmon_train.training.metrics import attention_work, device_peak_flops, training_flops
from persimmon_train.training.tasks import TASKS, count_items

log = logging.getLogger("persimmon_train")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


class TrainingDivergedError(PersimmonTrainError):
    """The loss (or gradient) was NaN/Inf for too many steps in a row."""


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    consecutive_nonfinite: int = 0
    skipped_steps: int = 0
    last_checkpoint: str | None = None
    first_eval: dict = field(default_factory=dict)  # trainer.eval_at_start, before step 1
    final_eval: dict = field(default_factory=dict)
    stopped_early: str | None = None  # the agreed reason (a signal's name, trainer.max_minutes)
    tracker_run_id: str | None = None  # a resumed run's tracker run, continued


def count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def format_metrics(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def resume_state(path: str, *, strategy, scheduler, train_loader) -> TrainState:
    """Restore model, optimizer, schedule and loader from checkpoint `path`; return the loop's state.

    The RNG is restored last, so nothing built before the loop starts can shift it.
    """
    saved = checkpointing.load_checkpoint(path, strategy=strategy)
    scheduler.load_state_dict(saved["scheduler"])
    train_loader.load_state_dict(checkpointing.adapt_loader_state(saved["loader"], train_loader))
    state = TrainState(
        step=int(saved["step"]),
        tokens_seen=int(saved["tokens_seen"]),
        skipped_steps=int(saved.get("skipped_steps", 0)),
        last_checkpoint=path,
        tracker_run_id=saved.get("tracker_run_id"),
    )
    checkpointing.restore_rng(saved["rng"])
    log.info("resumed from %s at step %d", path, state.step)
    return state


def _rewind(loader) -> None:
    """Start an eval pass from the first batch: a pass cut short by eval_max_batches leaves the
    loader's position mid-way, and the next pass must see the same batches."""
    if hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict"):
        state = loader.state_dict()
        if "batch" in state:
            loader.load_state_dict({**state, "epoch": 0, "batch": 0})


class Trainer:
    def __init__(
        self,
        cfg,
        *,
        strategy,
        model,
        optimizer=None,  # None: evaluation only
        scheduler=None,
        train_loader=None,
        eval_loader=None,
        tracker=None,
        metrics_file=None,
        output_dir: str = "",
        id2label: dict | None = None,
        on_checkpoint=None,
        tokenizer=None,
        checkpoint_metadata: dict | None = None,
        state: TrainState | None = None,
        stop_flag=None,
    ):
        self.cfg = cfg
        self.task = cfg.task
        self.strategy = strategy
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.eval_loader = eval_loader
        self.tracker = tracker
        self.metrics_file = metrics_file
        self.output_dir = output_dir
        self.id2label = id2label or {}
        self.peak_flops = device_peak_flops(strategy.device, cfg.trainer.peak_tflops)  # None: no MFU
        self.state = state or TrainState()  # resume_state(...) for a resumed run
        self.on_checkpoint = on_checkpoint
        self.tokenizer = tokenizer  # saved into each checkpoint, so export needs no other file
        self.checkpoint_metadata = checkpoint_metadata or {}
        self.stop_flag = stop_flag  # preemption.StopFlag: polled (collectively) at every step boundary
        self.pending_save = None  # checkpointing.BackgroundSave in flight (checkpoint.async_save)
        self.objective = None  # training/preference.py (dpo, reward): loss, items and metrics of a batch

    # ------------------------------------------------------------------ checkpoints
    def trainer_state_dict(self) -> dict:
        return {
            "step": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "skipped_steps": self.state.skipped_steps,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "rng": checkpointing.capture_rng(),
            "tracker_run_id": getattr(self.tracker, "run_id", None),
        }

    def resume_from(self, path: str) -> TrainState:
        self.state = resume_state(
            path, strategy=self.strategy, scheduler=self.scheduler, train_loader=self.train_loader
        )
        return self.state

    def save(self, wait: bool = False) -> str | None:
        """Checkpoint this step. With checkpoint.async_save the files are written in the background
        (at most one save in flight: a new one first waits for the last) and this returns None,
        unless `wait`; `state.last_checkpoint` names a checkpoint once it is complete."""
        kwargs = dict(
            strategy=self.strategy,
            trainer_state=self.trainer_state_dict(),
            metadata=self.checkpoint_metadata,
            tokenizer=self.tokenizer,
            keep_last=self.cfg.checkpoint.keep_last,
        )
        if self.cfg.checkpoint.async_save:
            self.wait_for_save()
            self.pending_save = checkpointing.BackgroundSave(self.output_dir, self.state.step, **kwargs)
            return self.wait_for_save() if wait else None
        return self._saved(checkpointing.save_run_checkpoint(self.output_dir, self.state.step, **kwargs))

    def wait_for_save(self) -> str | None:
        """Join the save in flight, if any (every rank: its end is collective)."""
        pending, self.pending_save = self.pending_save, None
        return self._saved(pending.wait()) if pending is not None else None

    def _saved(self, path: str) -> str:
        self.state.last_checkpoint = path
        log.info("checkpoint: %s", path)
        if self.on_checkpoint is not None:
            self.on_checkpoint(path)
        return path

    # ------------------------------------------------------------------ one step
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.strategy.device, non_blocking=True) for k, v in batch.items()}

    def _forward_loss(self, batch: dict, global_items: torch.Tensor) -> torch.Tensor:
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        with self.strategy.autocast():
            if self.objective is not None:
                return self.objective.loss(self.model, batch, global_items)
            if TASKS[self.task].head_averages:
                # The head averages over its rows; re-weight so the step averages over all rows.
                out = self.model(**inputs, labels=batch["labels"])
                return out.loss * (count_items(batch, self.task) / global_items)
            return self.model(**inputs, labels=batch["labels"], num_items_in_batch=global_items).loss

    def train_step(self, micro_batches: list[dict]) -> dict:
        strategy = self.strategy
        count = self.objective.count_items if self.objective is not None else lambda b: count_items(b, self.task)
        local_items = sum(count(b) for b in micro_batches)
        local_tokens = sum(count_tokens(b) for b in micro_batches)
        local_attention = sum(attention_work(b) for b in micro_batches) if self.peak_flops else 0
        counts = strategy.reduce_sum(
            torch.tensor([local_items, local_tokens, local_attention], dtype=torch.float64, device=strategy.device)
        )
        global_items = counts[0].clamp(min=1).to(torch.float32)
        self.model.train()
        loss_sum = torch.zeros((), device=strategy.device, dtype=torch.float32)
        for i, batch in enumerate(micro_batches):
            batch = self._to_device(batch)
            with strategy.accumulation_context(is_last_micro_batch=i == len(micro_batches) - 1):
                loss = self._forward_loss(batch, global_items)
                strategy.backward(loss)
            loss_sum += loss.detach().float()
        loss = strategy.reduce_sum(loss_sum)
        lr = self.scheduler.get_last_lr()[0]
        grad_norm, finite = strategy.clip_and_step(self.cfg.optim.grad_clip, bool(torch.isfinite(loss)))
        if finite:
            self.state.consecutive_nonfinite = 0
        else:
            self.state.consecutive_nonfinite += 1
            self.state.skipped_steps += 1
        strategy.zero_grad()
        self.scheduler.step()
        extra = self.objective.train_metrics(global_items) if self.objective is not None else {}
        return {
            "extra": extra,
            "loss": float(loss),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "finite": finite,
            "tokens": int(counts[1]),
            "attention": float(counts[2]),
        }

    # ------------------------------------------------------------------ eval
    def eval_batches(self):
        """An eval pass's batches on the run's device: the same ones every pass (from the first, see
        `_rewind`), at most trainer.eval_max_batches. Every eval reads them here: this Trainer's and
        a preference objective's (training/preference.py)."""
        limit = self.cfg.trainer.eval_max_batches
        _rewind(self.eval_loader)
        for index, batch in enumerate(self.eval_loader):
            if limit is not None and index >= limit:
                break
            yield self._to_device(batch)

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.eval_loader is None:
            return {}
        if self.objective is not None:
            return self.objective.evaluate(self)
        task = TASKS[self.task]
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.strategy.device)
        items = 0
        preds, golds = [], []
        for batch in self.eval_batches():
            inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
            labels = batch["labels"]
            batch_items = task.count_items(batch)
            with self.strategy.autocast():
                if task.head_averages:
                    out = self.model(**inputs, labels=labels)
                    if batch_items:
                        loss_sum += out.loss.double() * batch_items
                else:
                    out = self.model(**inputs, labels=labels, num_items_in_batch=1)  # summed loss
                    loss_sum += out.loss.double()
            items += batch_items
            if task.collect is not None:
                task.collect(
                    out.logits.float(),
                    labels,
                    preds,
                    golds,
                    problem_type=self._problem_type(labels),
                    id2label=self.id2label,
                )
        if self.strategy.world_size > 1 and task.collect is not None:
            # Metrics such as macro-F1 do not decompose over ranks: gather every rank's predictions.
            gathered = self.strategy.all_gather_object((preds, golds))
            preds = [p for rank_preds, _ in gathered for p in rank_preds]
            golds = [g for _, rank_golds in gathered for g in rank_golds]
        totals = self.strategy.reduce_sum(
            torch.stack([loss_sum, torch.tensor(float(items), dtype=torch.float64, device=loss_sum.device)])
        )
        eval_loss = float(totals[0] / totals[1].clamp(min=1))
        metrics = {"eval_loss": eval_loss, **task.metrics(eval_loss, preds, golds)}
        self.model.train()
        return metrics

    def _flops(self, tokens: int, attention: float) -> float:
        config = self.strategy.unwrapped_model().config
        full = self.cfg.peft.method == "none"
        return training_flops(config, tokens, attention, full_finetune=full, task=self.task)

    def _problem_type(self, labels: torch.Tensor) -> str:
        config = getattr(self.strategy.unwrapped_model(), "config", None)
        problem = getattr(config, "problem_type", None)
        if problem:
            return problem
        return "single_label_classification" if labels.dtype == torch.long else "multi_label_classification"

    # ------------------------------------------------------------------ the loop
    def _log(self, metrics: dict) -> None:
        if self.strategy.is_main:
            self.metrics_file.log(metrics, self.state.step)
            self.tracker.log(metrics, self.state.step)

    def fit(self) -> TrainState:
        t = self.cfg.trainer
        state = self.state
        if t.eval_at_start and state.step == 0 and self.eval_loader is not None:
            state.first_eval = self._eval_and_log()
        iterator = iter(self.train_loader)
        bar = self._progress_bar()
        window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
        while state.step < t.max_steps:
            micro_batches = [next(iterator) for _ in range(t.grad_accum_steps)]
            result = self.train_step(micro_batches)
            state.step += 1
            state.tokens_seen += result["tokens"]
            window_tokens += result["tokens"]
            if self.peak_flops:
                window_flops += self._flops(result["tokens"], result["attention"])
            if not result["finite"]:
                log.warning(
                    "step %d: non-finite loss/grad (loss=%s, grad_norm=%s); step skipped (%d in a row)",
                    state.step,
                    result["loss"],
                    result["grad_norm"],
                    state.consecutive_nonfinite,
                )
                if state.consecutive_nonfinite >= t.max_nonfinite_steps:
                    raise TrainingDivergedError(
                        f"loss was NaN/Inf for {state.consecutive_nonfinite} steps in a row (up to step "
                        f"{state.step}; trainer.max_nonfinite_steps={t.max_nonfinite_steps}); stopped. Last good "
                        f"checkpoint: {state.last_checkpoint or 'none'} -- try a lower optim.lr or "
                        f"trainer.precision=bf16"
                    )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{result['lr']:.2e}", refresh=False)
            if state.step % t.log_every_n_steps == 0 or state.step == t.max_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                metrics = {
                    "loss": result["loss"],
                    "lr": result["lr"],
                    "grad_norm": result["grad_norm"],
                    "tokens_per_sec": window_tokens / elapsed,
                    "tokens_seen": state.tokens_seen,
                    "peak_mem_gb": peak_memory_gb(self.strategy.device),
                }
                if self.peak_flops:
                    metrics["mfu"] = window_flops / elapsed / (self.peak_flops * self.strategy.world_size)
                metrics.update(result["extra"])
                if not result["finite"]:
                    metrics["skipped"] = 1
                self._log(metrics)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{result['loss']:.4f}", lr=f"{result['lr']:.2e}", tok_s=f"{metrics['tokens_per_sec']:.0f}"
                    )
                window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
            if t.eval_every_n_steps and state.step % t.eval_every_n_steps == 0 and state.step < t.max_steps:
                self._eval_and_log()
            every = self.cfg.checkpoint.every_n_steps
            # While losses are non-finite, keep the last good checkpoint rather than rotate it out.
            if every and state.step % every == 0 and state.consecutive_nonfinite == 0:
                self.save()
            if self.stop_flag is not None and state.step < t.max_steps and self._stop_requested():
                break
        if state.stopped_early:
            if bar is not None:
                bar.close()
            return state
        final_metrics = self._eval_and_log() if self.eval_loader is not None else {}
        self.wait_for_save()
        if bar is not None:
            bar.close()
        state.final_eval = final_metrics
        return state

    def _stop_requested(self) -> bool:
        """Every rank agrees (one small all-reduce) whether to stop after this step; if so, save it."""
        reason = self.stop_flag.poll(self.strategy)
        if reason is None:
            return False
        state = self.state
        self.wait_for_save()  # a save in flight finishes first
        if state.last_checkpoint is None or os.path.basename(state.last_checkpoint) != f"step_{state.step}":
            self.save(wait=True)
        state.stopped_early = reason
        log.warning(
            "%s: stopping after step %d of %d; checkpoint %s (resume=auto continues from it)",
            reason,
            state.step,
            self.cfg.trainer.max_steps,
            state.last_checkpoint,
        )
        return True

    def _eval_and_log(self) -> dict:
        metrics = self.evaluate()
        if metrics:
            self._log(metrics)
            log.info("step %d eval: %s", self.state.step, format_metrics(metrics))
        return metrics

    def _progress_bar(self):
        if not (self.cfg.trainer.progress_bar and self.strategy.is_main):
            return None
        import sys

        from tqdm.auto import tqdm

        # Redirected to a file (CI, nohup): refresh rarely instead of one line per step.
        interval = 0.1 if sys.stderr.isatty() else 15.0
        return tqdm(
            total=self.cfg.trainer.max_steps,
            initial=self.state.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=interval,
        )
