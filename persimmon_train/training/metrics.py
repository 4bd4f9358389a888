"""Evaluation metrics: accuracy / macro-F1 for classification, entity-level F1 for tagging."""

from __future__ import annotations


def accuracy(preds: list[int], labels: list[int]) -> float:
    if not labels:
        return 0.0
    return sum(int(p == t) for p, t in zip(preds, labels)) / len(labels)


def macro_f1(preds: list[int], labels: list[int], num_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes seen in labels or predictions."""
    classes = set(labels) | set(preds) if num_classes is None else set(range(num_classes)) & (set(labels) | set(preds))
    if not classes:
        return 0.0
    scores = []
    for c in sorted(classes):
        tp = sum(1 for p, t in zip(preds, labels) if p == c and t == c)
        fp = sum(1 for p, t in zip(preds, labels) if p == c and t != c)
        fn = sum(1 for p, t in zip(preds, labels) if p != c and t == c)
        scores.append(_f1(tp, fp, fn))
    return sum(scores) / len(scores)


def _f1(tp: int, fp: int, fn: int) -> float:
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) spans from IOB2/BIO tags (also IOB1-ish: a stray I- starts an entity).

    Tags without a B-/I- prefix other than "O" are single-type spans of their own name.
    """
    spans, kind, start = set(), None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, name = tag.partition("-") if "-" in tag else ("", "", tag)
        if tag == "O" or prefix == "B" or (prefix == "I" and name != kind) or (not prefix and name != kind):
            if kind is not None:
                spans.add((kind, start, i))
            kind, start = (None, i) if tag == "O" else (name, i)
    return spans


def entity_f1(pred_sequences: list[list[str]], label_sequences: list[list[str]]) -> dict[str, float]:
    """Micro-averaged entity-level precision / recall / F1 (a span counts only if type and bounds match)."""
    tp = fp = fn = 0
    for pred, gold in zip(pred_sequences, label_sequences):
        p, g = entities(pred), entities(gold)
        tp += len(p & g)
        fp += len(p - g)
        fn += len(g - p)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}

