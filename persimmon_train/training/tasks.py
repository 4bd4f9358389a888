"""What differs between the three heads, in one place: the data formats each trains on, what the
loss averages over, how eval predictions are collected, which metrics are reported.

The config check and the trainer ask `TASKS[cfg.task]` instead of branching on task names, so a new
head is one entry here (next to its class in `persimmon_train.model.HEADS`), not edits scattered
through the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from persimmon_train.model.loss import IGNORE_INDEX
from persimmon_train.training.metrics import classification_metrics, entity_f1


def _shifted_targets(batch: dict) -> int:
    """Causal LM: next-token targets (position 0 is never one)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _labelled_tokens(batch: dict) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


def _rows(batch: dict) -> int:
    """Sequence classification: rows; single-label eval filler rows carry label -100 and do not count."""
    labels = batch["labels"]
    return _labelled_tokens(batch) if labels.dtype == torch.long else int(labels.shape[0])


def _collect_classes(logits, labels, preds: list, golds: list, *, problem_type: str, id2label: dict) -> None:
    if problem_type == "regression":
        preds.extend(logits.squeeze(-1).tolist())
        golds.extend(labels.float().tolist())
    elif problem_type == "multi_label_classification":
        preds.extend((logits > 0).int().tolist())
        golds.extend(labels.int().tolist())
    else:
        keep = labels != IGNORE_INDEX  # eval filler rows
        preds.extend(logits.argmax(-1)[keep].tolist())
        golds.extend(labels[keep].tolist())


def _collect_tags(logits, labels, preds: list, golds: list, *, problem_type: str, id2label: dict) -> None:
    def tag(index: int) -> str:
        return str(id2label.get(index, id2label.get(str(index), index)))

    for row_pred, row_gold in zip(logits.argmax(-1).tolist(), labels.tolist()):
        keep = [i for i, g in enumerate(row_gold) if g != IGNORE_INDEX]
        preds.append([tag(row_pred[i]) for i in keep])
        golds.append([tag(row_gold[i]) for i in keep])


@dataclass(frozen=True)
class Task:
    name: str
    formats: tuple[str, ...]  # the data.format values it trains on
    count_items: Callable[[dict], int]  # what the loss averages over
    # True: the head returns a mean over its own rows (re-weighted by the trainer to the global
    # batch); False: it takes num_items_in_batch and returns sum / that count.
    head_averages: bool
    collect: Callable | None  # eval predictions for metrics that need them
    metrics: Callable[[float, list, list], dict]


TASKS: dict[str, Task] = {
    "causal_lm": Task(
        "causal_lm",
        ("text", "chat"),
        _shifted_targets,
        head_averages=False,
        collect=None,
        metrics=lambda loss, preds, golds: {"eval_ppl": math.exp(min(loss, 50.0))},
    ),
    "sequence_classification": Task(
        "sequence_classification",
        ("classification",),
        _rows,
        head_averages=True,
        collect=_collect_classes,
        metrics=lambda loss, preds, golds: classification_metrics(preds, golds),
    ),
    "token_classification": Task(
        "token_classification",
        ("token_classification",),
        _labelled_tokens,
        head_averages=False,
        collect=_collect_tags,
        metrics=lambda loss, preds, golds: entity_f1(preds, golds),
    ),
}


def count_items(batch: dict, task: str) -> int:
    """What the loss of `task` averages over, in `batch`."""
    return TASKS[task].count_items(batch)
