"""Hydra-style multirun: `persimmon-train finetune -m optim.lr=1e-4,3e-4 peft=lora,none`.

Every combination of the sweep overrides becomes one job (Hydra's own override grammar and
expansion: `a,b`, `range(...)`, `choice(...)`, `glob(...)`), run one after another in this process
into `<sweep dir>/<n>/` with its own metrics.jsonl, checkpoints and config.yaml. The sweep dir is
`output_dir` when given, else `outputs/<job>/multirun-<timestamp>`. `sweep_summary.csv` there gets
one row per job (its swept overrides, final eval loss and metrics, steps, status, folder),
rewritten after every job so an interrupted sweep still has its finished rows.

Every job's config is composed and checked before the first one trains: a bad value in the last
combination, or a job folder that holds an earlier run (a rerun of the sweep: pass overwrite=true
to start every job over), stops the sweep before any compute. We run jobs ourselves rather than through
`@hydra.main` because the recipes compose with Hydra's compose API (cli.py), which has no
launcher; the expansion is Hydra's.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import time
from pathlib import Path

from persimmon_train.cli import load_config, override_key
from persimmon_train.errors import ConfigError
from persimmon_train.recipes import TRAINING_JOBS

SUMMARY = "sweep_summary.csv"


def expand(overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """All jobs (each a list of plain overrides) and the keys being swept."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    return jobs, swept


def final_eval(output_dir: str) -> tuple[dict, int | None]:
    """The last eval metrics and the last step in a job's metrics.jsonl (or eval_metrics.json)."""
    metrics, step = {}, None
    path = os.path.join(output_dir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                step = row.get("step", step)
                evals = {k: v for k, v in row.items() if k.startswith("eval_")}
                if evals:
                    metrics = evals
    elif os.path.isfile(os.path.join(output_dir, "eval_metrics.json")):
        with open(os.path.join(output_dir, "eval_metrics.json"), encoding="utf-8") as f:
            metrics = json.load(f)
    return metrics, step


def write_summary(path: Path, rows: list[dict]) -> None:
    extra = sorted({k for r in rows for k in r if k.startswith("eval_") and k != "eval_loss"})
    fields = ["job", "overrides", "final_eval_loss", *extra, "steps", "status", "output_dir"]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "final_eval_loss": row.get("eval_loss", "")})
    os.replace(tmp, path)


def run_sweep(job: str, main, inv) -> list[dict]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "-m (multirun) runs its jobs one after another in one process; under a distributed "
            "launcher start one launch per combination instead"
        )
    jobs, swept = expand(inv.overrides)
    if not swept:
        raise ConfigError("-m (multirun): no sweep in the overrides (e.g. optim.lr=1e-4,3e-4)")
    if "output_dir" in swept:
        raise ConfigError("output_dir: cannot be swept; each job gets <output_dir>/<n>/")
    given = [o for o in jobs[0] if override_key(o) == "output_dir"]
    default = os.path.join("outputs", job, time.strftime("multirun-%Y%m%d-%H%M%S"))
    base = given[-1].split("=", 1)[1] if given else default
    base_dir = Path(base).expanduser().resolve()

    # Compose and check every job before the first trains.
    planned = []
    for n, overrides in enumerate(jobs):
        own = [o for o in overrides if override_key(o) != "output_dir"] + [f"output_dir={base_dir / str(n)}"]
        cfg = load_config(job, own, inv.config_path, inv.config_name)
        if job in TRAINING_JOBS:
            from persimmon_train.training.preflight import preflight
            from persimmon_train.training.run_folder import check_start

            preflight(cfg, job)
            check_start(cfg, os.path.abspath(cfg.output_dir))  # a rerun of the sweep: refused before job 0
        planned.append(([o for o in overrides if override_key(o) in swept], cfg))

    base_dir.mkdir(parents=True, exist_ok=True)
    summary = base_dir / SUMMARY
    rows: list[dict] = []
    print(f"[sweep] {len(planned)} jobs over {', '.join(swept)} into {base_dir}", flush=True)
    for n, (swept_overrides, cfg) in enumerate(planned):
        print(f"[sweep] job {n}/{len(planned) - 1}: {' '.join(swept_overrides)}", flush=True)
        row = {"job": n, "overrides": " ".join(swept_overrides), "output_dir": cfg.output_dir, "status": "running"}
        rows.append(row)
        try:
            main(cfg)
        except BaseException as exc:
            row["status"] = f"failed: {type(exc).__name__}"
            write_summary(summary, rows)
            raise
        finally:
            gc.collect()
        metrics, step = final_eval(cfg.output_dir)
        row.update(metrics, steps=step if step is not None else "", status="ok")
        write_summary(summary, rows)
    print(f"[sweep] summary: {summary}", flush=True)
    for row in rows:
        loss = row.get("eval_loss")
        print(
            f"  {row['job']}: {row['overrides']:<40} final eval loss "
            f"{loss if not isinstance(loss, float) else f'{loss:.4f}'}  {row['output_dir']}",
            flush=True,
        )
    return rows
