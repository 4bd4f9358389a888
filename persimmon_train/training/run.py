"""A run from a validated RunConfig: `train` (any task) and `evaluate`, over one `build`."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf

from persimmon_train.errors import ConfigError, StoppedEarly
from persimmon_train.storage import checkpoints as store
from persimmon_train.storage import safetensors_io
from persimmon_train.training import builders, checkpointing, memory_plan, preemption, run_folder
from persimmon_train.training.optim import build_optimizer, build_scheduler
from persimmon_train.training.preference import setup_objective
from persimmon_train.training.preflight import preflight
from persimmon_train.training.trackers import JsonlMetrics, build_tracker, plot_loss_curve, redact_secrets
from persimmon_train.training.trainer import Trainer, TrainState, format_metrics, resume_state

log = logging.getLogger("persimmon_train")


@dataclass
class RunResult:
    output_dir: str
    steps: int
    seconds: float
    final_dir: str | None = None  # set by the export layer (export.exporter.export_run_outputs)
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


@dataclass
class Built:
    """What a run builds from its config, in this order; train and evaluate share it."""

    tokenizer: Any
    data: Any  # builders.build_data_bundle: loaders and labels
    base_model: Any  # the task's head model before LoRA and wrapping
    model: Any  # what forward runs on: LoRA / activation checkpointing applied, placed by the strategy
    checkpoint_metadata: dict = field(default_factory=dict)  # what each checkpoint's manifest carries
    optimizer: Any = None  # evaluation builds none
    scheduler: Any = None


def build(cfg, strategy, *, training: bool, resume: tuple[str, dict] | None = None) -> Built:
    """Tokenizer -> data -> model (checked against the `resume` checkpoint's manifest before any
    weight is read) -> LoRA, activation checkpointing, compile -> the strategy's wrap, which loads
    model.path (and, when training, builds the optimizer and schedule)."""
    if strategy.device.type == "cpu":
        # Tensors of 1 MiB and more get a mapping of their own, returned to the OS when freed:
        # glibc would recycle them through its heap, whose holes stay resident. Measured
        # (bench/persimmon_8b.py --layers 8, LoRA on a bf16 base, seq 512): peak 8.52 -> 8.07 GiB;
        # QLoRA dequantizes a matrix per matmul (bench/lora_memory.py: 1803 -> 1343 MB).
        safetensors_io.map_large_blocks()
    tokenizer = builders.build_tokenizer(cfg)
    data = builders.build_data_bundle(cfg, tokenizer, strategy)
    if not training and data.eval_loader is None:
        raise ConfigError("data.eval_files: no eval data to evaluate on (set data.eval_files or data.eval_fraction)")
    builders.set_seed(cfg.trainer.seed)
    base_model = builders.build_model(cfg, tokenizer, data, meta=strategy.loads_sharded_weights)
    if resume:
        checkpointing.check_resumable(*resume, cfg, base_model.config, type(base_model), strategy)
    metadata = checkpointing.manifest_metadata(cfg, strategy, base_model)
    model = builders.prepare_for_training(base_model, cfg, training=training)
    if not training:
        model, _ = strategy.wrap(model, None)
        return Built(tokenizer, data, base_model, model, metadata)
    model, optimizer = strategy.wrap(model, lambda m: build_optimizer(m, cfg.optim))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    return Built(tokenizer, data, base_model, model, metadata, optimizer, scheduler)


def train(cfg, job: str, keep_lock: bool = False) -> RunResult:
    """Build everything from `cfg`, train, evaluate, checkpoint. Returns where things went.

    Order matters: the config, output_dir (not in use by another run; holding no earlier run
    unless resumed or overwrite=true), the resume checkpoint (manifest, sizes, checksums, then the
    state itself), the tokenizer, the data and the model are all validated before anything in
    output_dir is created, truncated or rewritten -- a command that fails leaves the folder
    byte-identical. From then on rank 0 holds output_dir's lock (run_folder); `keep_lock`: the
    result still holds it (the caller exports final/ under it, then calls result.release_lock()).
    The run ends with a checkpoint of its last step, which `export.exporter.export_run_outputs`
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
    resume = store.choose_resume(cfg.resume, output_dir, comm=strategy)  # validates manifest + checksums
    cfg.output_dir = output_dir  # the saved config names the folder, so a resume command can be copied from it
    log.info(
        "%s: output_dir=%s strategy=%s precision=%s device=%s",
        job,
        output_dir,
        strategy.name,
        f"{strategy.precision} (trainer.precision={cfg.trainer.precision})",
        strategy.device,
    )
    if cfg.resume in ("latest", "auto") and resume is None:
        log.info("resume=%s: no complete checkpoint in %s yet; starting from scratch", cfg.resume, output_dir)
    elif cfg.resume == "auto":
        log.info("resume=auto: resuming from %s", resume[0])
    memory_plan.check_run(cfg, strategy)  # logs the estimate; refuses a run that cannot fit (trainer.check_memory)
    start_step = int(resume[1].get("step", -1)) if resume else 0
    restarts = preemption.check_restart(output_dir, start_step, cfg.trainer.max_restarts_without_progress)

    built = build(cfg, strategy, training=True, resume=resume)
    objective = setup_objective(cfg, built.model, built.data, strategy)  # dpo / reward; before resumed weights
    loader = built.data.train_loader
    state = (
        resume_state(resume[0], strategy=strategy, scheduler=built.scheduler, train_loader=loader)
        if resume
        else TrainState()
    )

    # Everything validated: from here on output_dir is ours to write.
    builders.create_output_dir(output_dir, strategy)
    lock = run_folder.lock_run(output_dir, strategy, overwrite=cfg.overwrite)
    try:
        builders.add_file_logging(output_dir, strategy.is_main)
        if strategy.is_main:
            write_resolved_config(cfg, output_dir)
            store.remove_stale_temporaries(output_dir)
            preemption.record_start(output_dir, start_step, restarts)
        tracker = build_tracker(
            cfg.tracker,
            config=config_dict(cfg),
            output_dir=output_dir,
            run_name=os.path.basename(output_dir),
            run_id=state.tracker_run_id,
            is_main=strategy.is_main,
        )
        metrics_path = os.path.join(output_dir, "metrics.jsonl")
        # The time budget counts from the start of the run (setup included).
        stop_flag = preemption.StopFlag(cfg.trainer.max_minutes, strategy.is_main, started=started_clock)
        trainer = Trainer(
            cfg,
            strategy=strategy,
            model=built.model,
            optimizer=built.optimizer,
            scheduler=built.scheduler,
            train_loader=loader,
            eval_loader=built.data.eval_loader,
            tracker=tracker,
            metrics_file=JsonlMetrics(metrics_path, state.step if resume else None) if strategy.is_main else None,
            output_dir=output_dir,
            id2label=built.data.id2label,
            tokenizer=built.tokenizer,
            checkpoint_metadata=built.checkpoint_metadata,
            state=state,
            stop_flag=stop_flag.install(),
        )
        trainer.objective = objective
        result = RunResult(output_dir=output_dir, steps=0, seconds=0.0, is_main=strategy.is_main)
        exit_code = 1
        try:
            state = trainer.fit()
            result.first_eval = state.first_eval
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
            tracker.finish(exit_code=exit_code)
        if strategy.is_main:
            plot_loss_curve(metrics_path, os.path.join(output_dir, "loss_curve.png"))
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


def print_summary(result: RunResult, job: str) -> None:
    """Where things went, on stdout (rank 0)."""
    if not result.is_main:
        return
    d = result.output_dir
    lines = [f"{job}: {result.steps} steps in {result.seconds:.1f}s"]
    if result.first_eval.get("eval_loss") is not None and result.final_eval.get("eval_loss") is not None:
        lines.append(f"  eval loss:    {result.first_eval['eval_loss']:.4f} -> {result.final_eval['eval_loss']:.4f}")
    elif result.final_eval:
        lines.append(f"  final eval:   {format_metrics(result.final_eval)}")
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
    if not cfg.data.train_files:  # build_data wants a train split; evaluation only reads eval data
        cfg.data.train_files = list(cfg.data.eval_files)
    preflight(cfg, job)
    strategy = builders.build_strategy(cfg)
    output_dir = builders.resolve_output_dir(cfg, job, strategy)
    builders.setup_logging(None, strategy.is_main)
    resume = store.choose_resume(cfg.resume, output_dir, comm=strategy) if cfg.resume else None
    if cfg.resume and resume is None:
        raise ConfigError(f"resume: no complete checkpoint in {output_dir} to evaluate")
    built = build(cfg, strategy, training=False, resume=resume)
    if resume:
        strategy.load_state(resume[0])
        log.info("evaluating checkpoint %s", resume[0])
    data = built.data
    trainer = Trainer(cfg, strategy=strategy, model=built.model, eval_loader=data.eval_loader, id2label=data.id2label)
    metrics = trainer.evaluate()
    builders.create_output_dir(output_dir, strategy)
    if strategy.is_main:
        with open(os.path.join(output_dir, "eval_metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        print(json.dumps(metrics), flush=True)
        print(f"eval metrics: {os.path.join(output_dir, 'eval_metrics.json')}", flush=True)
    strategy.close()
    return metrics
