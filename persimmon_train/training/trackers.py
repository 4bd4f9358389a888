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

from persimmon_train.errors import first_line

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


# W&B retries an unreachable server for ~90 s by default; a compute node without internet should
# give up quickly and log offline instead. WANDB_INIT_TIMEOUT (seconds) overrides this.
INIT_TIMEOUT_S = 10.0


class WandbTracker:
    """W&B run; offline unless an API key is present (or tracker.mode says otherwise).

    - online but the service does not answer within INIT_TIMEOUT_S: the run goes on in offline
      mode, and the log names the `wandb sync DIR` command that uploads it later;
    - `run_id` (saved in every checkpoint's trainer_state): a resumed run continues that W&B run;
    - at the end the run's summary gets the final eval metrics and where the outputs are;
    - a failing init / log / summary / finish logs ONE warning and never stops training.
    """

    def __init__(self, cfg, *, config: dict, output_dir: str, run_name: str, run_id: str | None):
        self.run = None
        self.run_id = run_id
        self.output_dir = output_dir
        # tracker.mode, else the user's WANDB_MODE, else online only with an API key to log in with.
        self.mode = (
            cfg.mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        )
        self.final_eval: dict = {}
        self._warned = False
        self._logging = True
        try:
            import wandb
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self._warn("import", exc)
            return
        self._wandb = wandb
        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_name,
            tags=list(cfg.tags),
            config=config,
            dir=os.environ.get("WANDB_DIR") or output_dir,
            id=run_id,
            resume="allow" if run_id else None,
        )
        try:
            self.run = self._init(self.mode, kwargs)
        except Exception as exc:  # noqa: BLE001
            if self.mode != "online":
                self._warn("init", exc)
                return
            log.warning(
                "W&B did not answer within %gs (%s); logging offline instead",
                self.init_timeout(),
                redact_secrets(first_line(exc)),
            )
            try:
                self.mode = "offline"
                self.run = self._init("offline", kwargs)
            except Exception as exc2:  # noqa: BLE001
                self._warn("init", exc2)
                return
        self.run_id = getattr(self.run, "id", None) or run_id
        log.info(
            "W&B run %s (mode=%s%s) in %s", self.run_id, self.mode, ", resumed" if run_id else "", self.run_dir or "?"
        )
        if self.mode == "offline":
            log.info("W&B is offline; upload the run later with: %s", self.sync_command)

    @staticmethod
    def init_timeout() -> float:
        try:
            return float(os.environ.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT_S)
        except ValueError:
            return INIT_TIMEOUT_S

    def _init(self, mode: str, kwargs: dict):
        settings = self._wandb.Settings(console="off", silent=True, init_timeout=self.init_timeout())
        return self._wandb.init(mode=mode, settings=settings, **kwargs)

    @property
    def run_dir(self) -> str | None:
        """The run's own folder (`.../wandb/offline-run-<time>-<id>`), what `wandb sync` takes."""
        files = getattr(self.run, "dir", None)
        return os.path.dirname(files) if isinstance(files, str) and files else None

    @property
    def sync_command(self) -> str:
        return f"wandb sync {self.run_dir or os.path.join(os.environ.get('WANDB_DIR') or self.output_dir, 'wandb')}"

    def _warn(self, what: str, exc: BaseException) -> None:
        if not self._warned:
            log.warning(
                "W&B %s failed, training goes on (W&B may be incomplete): %s", what, redact_secrets(first_line(exc))
            )
            self._warned = True
        else:
            log.debug("W&B %s failed again: %s", what, redact_secrets(first_line(exc)))

    def log(self, metrics: dict, step: int) -> None:
        evals = {k: v for k, v in metrics.items() if k.startswith("eval_")}
        if evals:
            self.final_eval = evals
        if self.run is None or not self._logging:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as exc:  # noqa: BLE001
            self._warn("log", exc)
            self._logging = False  # one broken call is enough; finish() still tries to close the run

    def summary(self) -> dict:
        """What lands in the W&B run summary at the end: final eval metrics and where the outputs are."""
        out = {f"final/{k}": v for k, v in self.final_eval.items()}
        out["output_dir"] = self.output_dir
        for key, name in (
            ("final_model", "final"),
            ("adapter", "adapter"),
            ("metrics_file", "metrics.jsonl"),
            ("config_file", "config.yaml"),
            ("log_file", "train.log"),
        ):
            if os.path.exists(os.path.join(self.output_dir, name)):
                out[key] = os.path.join(self.output_dir, name)
        from persimmon_train.storage import list_step_dirs

        steps = list_step_dirs(self.output_dir)  # in step order (step_10 after step_9), as resume sees them
        if steps:
            out["last_checkpoint"] = steps[-1][1]
        return out

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(self.summary())
        except Exception as exc:  # noqa: BLE001
            self._warn("summary", exc)
        sync = self.sync_command
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            self._warn("finish", exc)
        self.run = None
        if self.mode == "offline":
            log.info("W&B offline run saved; upload it with: %s", sync)


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
