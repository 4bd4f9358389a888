"""`persimmon-train dpo [key=value ...]`: DPO on preference pairs (dpo.beta, dpo.loss=sigmoid|ipo,
dpo.label_smoothing); docs/preference.md.

Configs: persimmon_train/conf/dpo.yaml.
"""

from __future__ import annotations

from persimmon_train.cli import run_recipe
from persimmon_train.recipes.sweep import run_sweep


def main(cfg):
    from persimmon_train.export.run_outputs import train_and_export
    from persimmon_train.training.run import print_summary

    result = train_and_export(cfg, "dpo")
    print_summary(result, "dpo")
    return result


def run(argv: list[str] | None = None) -> None:
    run_recipe("dpo", main, argv, multirun=run_sweep)
