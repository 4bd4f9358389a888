"""`persimmon-train reward [key=value ...]`: a reward model (sequence classification, one output)
trained with the Bradley-Terry loss on preference pairs; docs/preference.md.

Configs: persimmon_train/conf/reward.yaml.
"""

from __future__ import annotations

from persimmon_train.cli import run_recipe
from persimmon_train.recipes.sweep import run_sweep


def main(cfg):
    from persimmon_train.export.run_outputs import train_and_export
    from persimmon_train.training.run import print_summary

    result = train_and_export(cfg, "reward")
    print_summary(result, "reward")
    return result


def run(argv: list[str] | None = None) -> None:
    run_recipe("reward", main, argv, multirun=run_sweep)
