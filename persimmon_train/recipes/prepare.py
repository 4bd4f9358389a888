"""Tokenize and pack a run's data into the cache ahead of training (on a CPU node, like `axolotl preprocess`).

    persimmon-train prepare [finetune|classify|tag|evaluate] [key=value ...] [--config-path DIR --config-name NAME]

Takes the same config and overrides as the training command that follows, runs the same cheap
checks, and calls the same `build_data` the run calls, so the run finds the prepared arrays
under the same cache key (`$PERSIMMON_TRAIN_CACHE` / `data.cache_dir` must be the same on both
machines) and starts training at once. Prints rows, tokens and packing efficiency per split.
Loader settings (batch size, ranks) are applied when the data is read, so one preparation
serves any world size.
"""

from __future__ import annotations

import sys

from persimmon_train.cli import prog, run_recipe
from persimmon_train.recipes import HYDRA_JOBS


def report(cfg, stats: dict) -> str:
    from persimmon_train.data.config import PACKED_FORMATS

    lines = [f"prepared data ({cfg.data.format}, seq_len {cfg.data.seq_len}) in {stats.get('cache', '?')}"]
    for split in ("train", "eval"):
        s = stats.get(split)
        if not s:
            continue
        if cfg.data.format in PACKED_FORMATS:
            lines.append(
                f"  {split}: {s['documents']} documents -> {s['rows']} rows of {cfg.data.seq_len} tokens, "
                f"{s['real_tokens']} real tokens, packing efficiency {100 * s['efficiency']:.2f}%, "
                f"{s['split_documents']} split / {s['dropped_documents']} dropped long documents"
            )
        else:
            lines.append(
                f"  {split}: {s['examples']} examples, {s['tokens']} tokens, {s['truncated']} truncated "
                f"to {cfg.data.seq_len} tokens"
            )
    if stats.get("skipped_rows"):
        lines.append(f"  skipped {stats['skipped_rows']} bad rows (data.on_bad_row=skip)")
    return "\n".join(lines)


def prepare(cfg, job: str) -> dict:
    """Cheap checks, then build_data exactly as the run will (rank 0 of any world size). Returns the stats."""
    from persimmon_train.data import build_data
    from persimmon_train.training.builders import build_tokenizer
    from persimmon_train.training.preflight import preflight

    preflight(cfg, job)
    if cfg.data.streaming:
        print("data.streaming=true: nothing to prepare (documents are tokenized while training)")
        return {}
    tokenizer = build_tokenizer(cfg)
    bundle = build_data(cfg.data, tokenizer, micro_batch_size=cfg.trainer.micro_batch_size, seed=cfg.trainer.seed)
    print(report(cfg, bundle.stats), flush=True)
    return bundle.stats


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    job = "finetune"
    if argv and argv[0] in HYDRA_JOBS:
        job, argv = argv[0], argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(
            f"usage: {prog('prepare')} [{'|'.join(HYDRA_JOBS)}] [key=value ...] "
            "[--config-path DIR --config-name NAME]\n"
            "the same overrides as the training command that follows; the default job is finetune"
        )
        return
    run_recipe(job, lambda cfg: prepare(cfg, job), argv)
