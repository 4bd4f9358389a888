"""Where metrics go: metrics.jsonl (always), W&B (optional), and a loss-curve PNG at the end.

A tracker failure must never stop training: every W&B call is wrapped, logged once, and the
tracker disables itself. The W&B API key is read by wandb from the environment only; it is never
copied into our config, logs or files.
"""

from __future__ import annotations

import json
import logging
import math
import os

log = logging.getLogger("persimmon_train")


def redact_secrets(text: str) -> str:
    """Replace the W&B API key wherever it might have slipped into text we write."""
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "***") if key and len(key) >= 8 else text


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


class JsonlMetrics:
    """output_dir/metrics.jsonl: one JSON object per logged step."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            # Drop lines past the checkpoint we resume from: they are about to be recomputed.
            with open(path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        elif os.path.exists(path):
            os.remove(path)

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class NullTracker:
    run_id: str | None = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker:
    """W&B run; offline unless an API key is present (or tracker.mode says otherwise)."""

    def __init__(self, cfg, *, config: dict, output_dir: str, run_name: str, run_id: str | None):
        self.run = None
        self.run_id = run_id
        mode = cfg.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        try:
            import wandb

            self._wandb = wandb
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or run_name, tags=list(cfg.tags),
                mode=mode, config=config, dir=os.environ.get("WANDB_DIR") or output_dir,
                id=run_id, resume="allow" if run_id else None,
                settings=wandb.Settings(console="off", silent=True),
            )
            self.run_id = getattr(self.run, "id", run_id)
            log.info("W&B run %s (mode=%s) in %s", self.run_id, mode, getattr(self.run, "dir", "?"))
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._fail("init", exc)

    def _fail(self, what: str, exc: Exception) -> None:
        log.warning("W&B %s failed, continuing without W&B: %s", what, redact_secrets(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__)
        self.run = None

    def log(self, metrics: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            self._fail("finish", exc)


def build_tracker(cfg, *, config: dict, output_dir: str, run_name: str, run_id: str | None, is_main: bool):
    """cfg: TrackerConfig. Only rank 0 talks to W&B."""
    if not is_main or cfg.backend == "none":
        return NullTracker()
    return WandbTracker(cfg, config=config, output_dir=output_dir, run_name=run_name, run_id=run_id)


def plot_loss_curve(metrics_path: str, out_path: str) -> str | None:
    """Train (and eval) loss against step, as a PNG. Skipped quietly without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed; no loss-curve PNG")
        return None
    train, evals = [], []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if isinstance(row.get("loss"), (int, float)):
                train.append((row["step"], row["loss"]))
            if isinstance(row.get("eval_loss"), (int, float)):
                evals.append((row["step"], row["eval_loss"]))
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
