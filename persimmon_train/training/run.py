"""One training run from a validated RunConfig: what `recipes/finetune.py` & co. call."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf

from persimmon_train.training import builders, checkpointing
from persimmon_train.training.export import export_final_model, save_adapter_folder
from persimmon_train.training.optim import build_optimizer, build_scheduler
from persimmon_train.training.trackers import JsonlMetrics, build_tracker, plot_loss_curve, redact_secrets
from persimmon_train.training.trainer import Trainer, flops_per_token

log = logging.getLogger("persimmon_train")


@dataclass
class RunResult:
    output_dir: str
    steps: int
    seconds: float
    final_dir: str | None = None
    first_eval: dict = field(default_factory=dict)
    final_eval: dict = field(default_factory=dict)
    last_checkpoint: str | None = None
    is_main: bool = True  # rank 0 of a distributed run (the only one that prints the summary)


def config_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def write_resolved_config(cfg, output_dir: str) -> str:
    path = os.path.join(output_dir, "config.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(redact_secrets(OmegaConf.to_yaml(OmegaConf.structured(cfg))))
    return path


def _peek_run_id(checkpoint: str | None) -> str | None:
    if checkpoint is None:
        return None
    state = torch.load(os.path.join(checkpoint, "trainer_state.pt"), map_location="cpu", weights_only=True)
    return state.get("tracker_run_id")


def train(cfg, job: str) -> RunResult:
    """Build everything from `cfg`, train, evaluate, checkpoint, export. Returns where things went."""
    started = time.perf_counter()
    strategy = builders.build_strategy(cfg)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    output_dir = builders.resolve_output_dir(cfg, job, strategy)
    resume_path = checkpointing.resolve_resume(cfg.resume, output_dir)  # a bad path fails before any output
    cfg.output_dir = output_dir  # the saved config names the folder, so a resume command can be copied from it
    builders.setup_logging(output_dir, strategy.is_main)
    if strategy.is_main:
        write_resolved_config(cfg, output_dir)
    log.info("%s: output_dir=%s strategy=%s precision=%s device=%s", job, output_dir, strategy.name,
             f"{strategy.precision} (trainer.precision={cfg.trainer.precision})", strategy.device)

    if cfg.resume == "latest" and resume_path is None:
        log.info("resume=latest: no checkpoint in %s yet; starting from scratch", output_dir)
    checkpointing.remove_stale_temporaries(output_dir) if strategy.is_main else None

    tokenizer = builders.build_tokenizer(cfg)
    data = builders.build_data_bundle(cfg, tokenizer, strategy)
    builders.set_seed(cfg.trainer.seed)
    base_model = builders.build_model(cfg, tokenizer, data, meta=strategy.loads_sharded_weights)
    model = builders.prepare_for_training(base_model, cfg)
    model, optimizer = strategy.wrap(model, lambda m: build_optimizer(m, cfg.optim))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)

    tracker = build_tracker(cfg.tracker, config=config_dict(cfg), output_dir=output_dir,
                            run_name=os.path.basename(output_dir), run_id=_peek_run_id(resume_path),
                            is_main=strategy.is_main)
    resume_step = int(os.path.basename(resume_path).split("_")[-1]) if resume_path else None
    metrics_file = JsonlMetrics(os.path.join(output_dir, "metrics.jsonl"), resume_step) if strategy.is_main else None
    trainer = Trainer(cfg, strategy=strategy, model=model, optimizer=optimizer, scheduler=scheduler,
                      train_loader=data.train_loader, eval_loader=data.eval_loader, tracker=tracker,
                      metrics_file=metrics_file, output_dir=output_dir, id2label=data.id2label,
                      flops_per_token=flops_per_token(base_model, base_model.config, cfg.data.seq_len,
                                                      cfg.peft.method == "none"))
    result = RunResult(output_dir=output_dir, steps=0, seconds=0.0, is_main=strategy.is_main)
    exit_code = 1
    try:
        if resume_path:
            trainer.resume_from(resume_path)
        elif cfg.trainer.eval_at_start and data.eval_loader is not None:
            result.first_eval = trainer.evaluate()
            trainer._log(result.first_eval)
            log.info("step 0 eval: %s", _fmt(result.first_eval))
        state = trainer.fit()
        result.steps, result.final_eval, result.last_checkpoint = state.step, state.final_eval, state.last_checkpoint
        if cfg.export.enabled:
            result.final_dir = export_final_model(
                strategy, cfg, model_class=type(base_model), model_config=base_model.config,
                tokenizer=tokenizer, out_dir=os.path.join(output_dir, "final"))
            save_adapter_folder(strategy, cfg, os.path.join(output_dir, "adapter"))
        exit_code = 0
    finally:
        tracker.finish(exit_code=exit_code)
    if strategy.is_main:
        plot_loss_curve(os.path.join(output_dir, "metrics.jsonl"), os.path.join(output_dir, "loss_curve.png"))
    result.seconds = time.perf_counter() - started
    strategy.close()
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
    if os.path.isdir(os.path.join(d, "adapter")):
        lines.append(f"  LoRA adapter: {os.path.join(d, 'adapter')}  (PEFT format)")
    if result.last_checkpoint:
        lines.append(f"  checkpoints:  {os.path.dirname(result.last_checkpoint)}  (resume=latest output_dir={d})")
    for name, what in (("metrics.jsonl", "metrics"), ("loss_curve.png", "loss curve"), ("train.log", "log"),
                       ("config.yaml", "config")):
        if os.path.exists(os.path.join(d, name)):
            lines.append(f"  {what + ':':<13} {os.path.join(d, name)}")
    print("\n".join(lines), flush=True)


def evaluate(cfg, job: str = "evaluate") -> dict:
    """Evaluate model.path (an HF folder, e.g. a run's final/) or a training checkpoint (resume=PATH)."""
    strategy = builders.build_strategy(cfg)
    output_dir = builders.resolve_output_dir(cfg, job, strategy)
    builders.setup_logging(output_dir, strategy.is_main)
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
        checkpoint = checkpointing.resolve_resume(cfg.resume, output_dir)
        strategy.load_state(checkpoint)
        log.info("evaluating checkpoint %s", checkpoint)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.trainer.max_steps)
    trainer = Trainer(cfg, strategy=strategy, model=model, optimizer=optimizer, scheduler=scheduler,
                      train_loader=data.train_loader, eval_loader=data.eval_loader, tracker=None,
                      metrics_file=None, output_dir=output_dir, id2label=data.id2label, flops_per_token=0.0)
    metrics = trainer.evaluate()
    if strategy.is_main:
        with open(os.path.join(output_dir, "eval_metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        print(json.dumps(metrics), flush=True)
        print(f"eval metrics: {os.path.join(output_dir, 'eval_metrics.json')}", flush=True)
    strategy.close()
    return metrics
