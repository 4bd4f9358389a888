"""Evaluate a model folder or a training checkpoint:
`persimmon-train evaluate model.path=DIR data.eval_files=[...] [task=...] [data=...]`.

Configs: persimmon_train/conf/evaluate.yaml. Prints the metrics and writes output_dir/eval_metrics.json.
"""

from __future__ import annotations

from persimmon_train.cli import run_recipe
from persimmon_train.recipes.sweep import run_sweep


def main(cfg):
    from persimmon_train.training.run import evaluate

    return evaluate(cfg, "evaluate")


def run(argv: list[str] | None = None) -> None:
    run_recipe("evaluate", main, argv, multirun=run_sweep)
