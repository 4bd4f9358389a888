"""Token classification (NER-style tags): `persimmon-train tag data.train_files=[...] [key=value ...]`.

Configs: persimmon_train/conf/tag.yaml; eval reports loss and entity-level precision / recall / F1.
"""

from __future__ import annotations

from persimmon_train.cli import run_recipe
from persimmon_train.recipes.sweep import run_sweep


def main(cfg):
    from persimmon_train.export.run_outputs import train_and_export
    from persimmon_train.training.run import print_summary

    result = train_and_export(cfg, "tag")
    print_summary(result, "tag")
    return result


def run(argv: list[str] | None = None) -> None:
    run_recipe("tag", main, argv, multirun=run_sweep)
