"""Causal-LM fine-tuning, full or LoRA: `persimmon-train finetune [key=value ...]`.

No overrides: the embedded default (LoRA, tiny model, demo chat data, CPU, about a minute).
Configs: persimmon_train/conf/finetune.yaml and its groups; docs/training.md.
"""

from __future__ import annotations

from persimmon_train.cli import run_recipe
from persimmon_train.recipes.sweep import run_sweep


def main(cfg):
    from persimmon_train.export.run_outputs import train_and_export
    from persimmon_train.training.run import print_summary

    result = train_and_export(cfg, "finetune")
    print_summary(result, "finetune")
    return result


def run(argv: list[str] | None = None) -> None:
    run_recipe("finetune", main, argv, multirun=run_sweep)
