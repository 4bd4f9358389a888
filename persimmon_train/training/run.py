"""One training run from a validated RunConfig: what `recipes/finetune.py` & co. call."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf

from persimmon_train.errors import StoppedEarly
from persimmon_train.storage import checkpoints as store
from persimmon_train.training import builders, checkpointing, memory_plan, preemption, run_folder
from persimmon_train.training.optim import build_optimizer, build_scheduler
from persimmon_train.training.preference import setup_objective
from persimmon_train.training.preflight import preflight
from persimmon_train.training.trackers import JsonlMetrics, build_tracker, plot_loss_curve, redact_secrets
from persimmon_train.training.trainer import Trainer, flops_per_token

log = logging.getLogger("persimmon_train")


@dataclass
class RunResult:
    output_dir: str
    steps: int
    seconds: float
    final_dir: str | None = None  # set by the export layer (persimmon_train.export.run_outputs)
    adapter_dir: str | None = None
    first_eval: dict = field(default_factory=dict)
    final_eval: dict = field(default_factory=dict)
    last_checkpoint: str | None = None
    is_main: bool = True  # rank 0 of a distributed run (the only one that prints the summary)
    lock: Any = field(default=None, repr=False)  # output_dir's run_folder.RunLock, with train(keep_lock=True)

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()


def config_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def write_resolved_config(cfg, output_dir: str) -> str:
    path = os.path.join(output_dir, "config.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(redact_secrets(OmegaConf.to_yaml(OmegaConf.structured(cfg))))
    return path


def train(cfg, job: str, keep_lock: bool = False) -> RunResult:
    """Build everything from `cfg`, train, evaluate, checkpoint. Returns where things went.

    Order matters: the config, output_dir (not in use by another run; holding no earlier run
    unless resumed or overwrite=true), the resume checkpoint (manifest, sizes, checksums, then the
    state itself), the tokenizer, the data and the model are all validated before anything in
    output_dir is created, truncated or rewritten -- a command that fails leaves the folder
    byte-identical. From then on rank 0 holds output_dir's lock (run_folder); `keep_lock`: the
    result still holds it (the caller exports final/ under it, then calls result.release_lock()).
    The run ends with a checkpoint of its last step, which `persimmon_train.export.run_outputs`
    turns into final/ (and adapter/), reading it from disk: no full gather onto rank 0.
    """
    started, started_clock = time.perf_counter(), time.monotonic()
    preflight(cfg, job)  # cheap checks (config.json, tokenizer, data paths) before output or data work
    strategy = builders.build_strategy(cfg)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    builders.setup_logging(None, strategy.is_main)  # console only until the output folder may be touched
    output_dir = builders.resolve_output_dir(cfg, job, strategy)
    run_folder.agree(strategy, lambda: run_folder.check_start(cfg, output_dir))  # in use? an earlier run?
    chosen = store.choose_resume(cfg.resume, output_dir, comm=strategy)  # validates manifest + checksums
    resume_path, manifest = chosen if chosen else (None, None)
    cfg.output_dir = output_dir  # the saved config names the folder, so a resume command can be copied from it
    log.info(
        "%s: output_dir=%s strategy=%s precision=%s device=%s",
        job,
        output_dir,
        strategy.name,
        f"{strategy.precision} (trainer.precision={cfg.trainer.precision})",
        strategy.device,
    )
    if cfg.resume in ("latest", "auto") and resume_path is None:
        log.info("resume=%s: no complete checkpoint in %s yet; starting from scratch", cfg.resume, output_dir)
    elif cfg.resume == "auto":
        log.info("resume=auto: resuming from %s", resume_path)
    memory_plan.check_run(cfg, strategy)  # logs the estimate; refuses a run that cannot fit (trainer.check_memory)
    start_step = int(manifest.get("step", -1)) if resume_path else 0
    restarts = preemption.check_restart(output_dir, start_step, cfg.trainer.max_restarts_without_progress)

    tokenizer = builders.build_tokenizer(cfg)
    data = builders.build_data_bundle(cfg, tokenizer, strategy)
    builders.set_seed(cfg.trainer.seed)
    base_model = builders.build_model(cfg, tokenizer, data, meta=strategy.loads_sharded_weights)
    if resume_path:
        checkpointing.check_resumable(resume_path, manifest, cfg, base_model.config, type(base_model), strategy)
    metadata = checkpointing.manifest_metadata(cfg, strategy, base_model)
    model = builders.prepare_for_training(base_model, cfg)
    model, optimizer = strategy.wrap(model, lambda m: build_optimizer(m, cfg.optim))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    trainer = Trainer(
        cfg,
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=data.train_loader,
        eval_loader=data.eval_loader,
        tracker=None,
        metrics_file=None,
        output_dir=output_dir,
        id2label=data.id2label,
        flops_per_token=flops_per_token(base_model, base_model.config, cfg.data.seq_len, cfg.peft.method == "none"),
        tokenizer=tokenizer,
        checkpoint_metadata=metadata,
    )
    trainer.objective = setup_objective(cfg, model, data, strategy)  # dpo / reward; before any resumed weights
    saved_state = trainer.resume_from(resume_path) if resume_path else {}

    # Everything validated: from here on output_dir is ours to write.
    builders.create_output_dir(output_dir, strategy)
    lock = run_folder.lock_run(output_dir, strategy, overwrite=cfg.overwrite)
    try:
        builders.add_file_logging(output_dir, strategy.is_main)
        if strategy.is_main:
            write_resolved_config(cfg, output_dir)
            store.remove_stale_temporaries(output_dir)
            preemption.record_start(output_dir, start_step, restarts)
        trainer.tracker = build_tracker(
            cfg.tracker,
            config=config_dict(cfg),
            output_dir=output_dir,
            run_name=os.path.basename(output_dir),
            run_id=saved_state.get("tracker_run_id"),
            is_main=strategy.is_main,
        )
        resume_step = trainer.state.step if resume_path else None
        if strategy.is_main:
            trainer.metrics_file = JsonlMetrics(os.path.join(output_dir, "metrics.jsonl"), resume_step)
        result = RunResult(output_dir=output_dir, steps=0, seconds=0.0, is_main=strategy.is_main)
        exit_code = 1
        # The time budget counts from the start of the run (setup included).
        stop_flag = preemption.StopFlag(cfg.trainer.max_minutes, strategy.is_main, started=started_clock)
        trainer.stop_flag = stop_flag.install()
        try:
            if not resume_path and cfg.trainer.eval_at_start and data.eval_loader is not None:
                result.first_eval = trainer.evaluate()
                trainer._log(result.first_eval)
                log.info("step 0 eval: %s", _fmt(result.first_eval))
            state = trainer.fit()
            if state.stopped_early:
                result.steps, result.last_checkpoint = state.step, state.last_checkpoint
                if strategy.is_main:
                    preemption.record_end(output_dir, state.stopped_early, state.step)
                exit_code = preemption.EXIT_STOPPED_EARLY
            else:
                if state.last_checkpoint is None or os.path.basename(state.last_checkpoint) != f"step_{state.step}":
                    trainer.save(wait=True)  # the run's result is a checkpoint; final/ is exported from it
                result.steps, result.final_eval = state.step, state.final_eval
                result.last_checkpoint = state.last_checkpoint
                if strategy.is_main:
                    preemption.record_end(output_dir, preemption.FINISHED, state.step)
                exit_code = 0
        finally:
            if exit_code != preemption.EXIT_STOPPED_EARLY:
                stop_flag.restore()
            trainer.tracker.finish(exit_code=exit_code)
        if strategy.is_main:
            plot_loss_curve(os.path.join(output_dir, "metrics.jsonl"), os.path.join(output_dir, "loss_curve.png"))
        result.seconds = time.perf_counter() - started
        strategy.close()
        if state.stopped_early:  # not finished: no export; the exit code says "resumable"
            # The handlers stayed until here: a launcher that signals the ranks still running when the
            # first one exits (torchrun does) must not kill them mid-way through the teardown.
            stop_flag.restore()
            raise StoppedEarly(f"stopped early ({state.stopped_early}) at step {state.step}: {state.last_checkpoint}")
    except BaseException:
        lock.release()
        raise
    if keep_lock:
        result.lock = lock
    else:
        lock.release()
    return result


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def print_summary(result: RunResult, job: str) -> None:
    """Where things went, on stdout (rank 0)."""
    if not result.is_main:
        return
    d = result.output_dir
    lines = [f"{job}: {result.steps} steps in {result.seconds:.1f}s"]
    if result.first_eval.get("eval_loss") is not None and result.final_eval.get("eval_loss") is not None:
        lines.append(f"  eval loss:    {result.first_eval['eval_loss']:.4f} -> {result.final_eval['eval_loss']:.4f}")
    elif result.final_eval:
        lines.append(f"  final eval:   {_fmt(result.final_eval)}")
    lines.append(f"  output_dir:   {d}")
    if result.final_dir:
        lines.append(f"  final model:  {result.final_dir}  (HF folder: transformers / from_pretrained)")
    if result.adapter_dir:
        lines.append(f"  LoRA adapter: {result.adapter_dir}  (PEFT format)")
    if result.last_checkpoint:
        lines.append(f"  checkpoints:  {os.path.dirname(result.last_checkpoint)}  (resume=latest output_dir={d})")
    for name, what in (
        ("metrics.jsonl", "metrics"),
        ("loss_curve.png", "loss curve"),
        ("train.log", "log"),
        ("config.yaml", "config"),
    ):
        if os.path.exists(os.path.join(d, name)):
            lines.append(f"  {what + ':':<13} {os.path.join(d, name)}")
    print("\n".join(lines), flush=True)


def evaluate(cfg, job: str = "evaluate") -> dict:
    """Evaluate model.path (an HF folder, e.g. a run's final/) or a training checkpoint (resume=PATH)."""
    strategy = builders.build_strategy(cfg)
    output_dir = builders.resolve_output_dir(cfg, job, strategy)
    builders.setup_logging(None, strategy.is_main)
    if not cfg.data.train_files:  # build_data wants a train split; evaluation only reads eval data
        cfg.data.train_files = list(cfg.data.eval_files)
    tokenizer = builders.build_tokenizer(cfg)
    data = builders.build_data_bundle(cfg, tokenizer, strategy)
    if data.eval_loader is None:
        from persimmon_train.errors import ConfigError

        raise ConfigError("data.eval_files: no eval data to evaluate on (set data.eval_files or data.eval_fraction)")
    builders.set_seed(cfg.trainer.seed)
    base_model = builders.build_model(cfg, tokenizer, data, meta=strategy.loads_sharded_weights)
    model = builders.prepare_for_training(base_model, cfg, training=False)
    model, optimizer = strategy.wrap(model, lambda m: build_optimizer(m, cfg.optim))
    if cfg.resume:
        chosen = store.choose_resume(cfg.resume, output_dir, comm=strategy)
        if chosen is None:
            from persimmon_train.errors import ConfigError

            raise ConfigError(f"resume: no complete checkpoint in {output_dir} to evaluate")
        checkpointing.check_resumable(chosen[0], chosen[1], cfg, base_model.config, type(base_model), strategy)
        strategy.load_state(chosen[0])
        log.info("evaluating checkpoint %s", chosen[0])
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    trainer = Trainer(
        cfg,
        strategy=strategy,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=data.train_loader,
        eval_loader=data.eval_loader,
        tracker=None,
        metrics_file=None,
        output_dir=output_dir,
        id2label=data.id2label,
        flops_per_token=0.0,
    )
    metrics = trainer.evaluate()
    builders.create_output_dir(output_dir, strategy)
    if strategy.is_main:
        with open(os.path.join(output_dir, "eval_metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        print(json.dumps(metrics), flush=True)
        print(f"eval metrics: {os.path.join(output_dir, 'eval_metrics.json')}", flush=True)
    strategy.close()
    return metrics
