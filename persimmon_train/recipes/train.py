"""The training jobs (`JOBS` in this package): train any task, then export.

    persimmon-train finetune|classify|tag [key=value ...]   (conf/<job>.yaml; its `task` picks the head)

No overrides: `finetune` runs the embedded default (LoRA, tiny model, demo chat data, CPU, about a
minute). Configs and keys: docs/training.md.
"""

from __future__ import annotations


def train(cfg, job: str):
    """Train `cfg.task`, export its last checkpoint as final/ (+ adapter/ for LoRA) while rank 0
    still holds output_dir's lock, then print where everything went."""
    from persimmon_train.export import exporter
    from persimmon_train.training import run

    result = run.train(cfg, job, keep_lock=True)
    try:
        exporter.export_run_outputs(result, cfg)
    finally:
        result.release_lock()
    run.print_summary(result, job)
    return result
