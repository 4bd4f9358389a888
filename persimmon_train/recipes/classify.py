"""Sequence classification: `persimmon-train classify data.train_files=[...] [key=value ...]`.

Configs: persimmon_train/conf/classify.yaml; eval reports loss, accuracy and macro-F1 (docs/training.md).
"""

from __future__ import annotations

from persimmon_train.cli import run_recipe
from persimmon_train.recipes.sweep import run_sweep


def main(cfg):
    from persimmon_train.export.run_outputs import train_and_export
    from persimmon_train.training.run import print_summary

    result = train_and_export(cfg, "classify")
    print_summary(result, "classify")
    return result


def run(argv: list[str] | None = None) -> None:
    run_recipe("classify", main, argv, multirun=run_sweep)
