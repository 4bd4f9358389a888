"""Metrics: model FLOPs utilisation (MFU) of training, and evaluation metrics.

MFU = a step's model FLOPs / (its seconds x the devices' dense bf16 peak), counted from the batch
(PaLM's and torchtitan's convention: activation checkpointing's recomputation does not count):
- weights: 2N per token forward (N: the decoder's and the head's matmul parameters), 6N with
  backward, 4N when the base is frozen (LoRA: input gradients only; the adapters are negligible);
- attention: 2 * hidden * L^2 forward per causal document of L tokens and layer, x3 with backward,
  per document: a packed row's documents never attend to each other.

Evaluation metrics, each the textbook definition (docs/training.md names them):

- single-label classification: accuracy; macro-F1 = unweighted mean over classes of each class's F1;
- multi-label classification: exact-match accuracy (every label of a row right); macro-F1 = the
  unweighted mean over labels of the F1 of the label's POSITIVE class (sklearn's
  `f1_score(average="macro")` on the indicator matrix). A label never predicted positive scores 0,
  so a model that predicts no positives at all scores 0.0 -- averaging the F1 of the 0 class in
  too would reward it for the (usually many) true negatives;
- regression: mean squared error;
- tagging: entity-level (span) micro precision / recall / F1.

F1 is 0 where it is undefined (no true positive), as sklearn's zero_division=0.
"""

from __future__ import annotations

import torch

# Dense bf16 peak TFLOP/s per device (trainer.peak_tflops overrides). Matched as substrings of the
# device name, in this order ("L40S" before "L4").
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
}


def device_peak_flops(device: torch.device, configured_tflops: float | None = None) -> float | None:
    """FLOP/s of one device: `configured_tflops`, else the table's entry for a known GPU, else None."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def matmul_parameters(config, task: str = "causal_lm") -> int:
    """Parameters that multiply activations: the decoder's matrices and the head (no embedding)."""
    h, i = config.hidden_size, config.intermediate_size
    head = config.vocab_size * h if task == "causal_lm" else config.num_labels * h
    return config.num_hidden_layers * (4 * h * h + 2 * h * i) + head


def attention_work(batch: dict) -> int:
    """sum(L^2) over the documents of `batch`'s rows (padding, when masked, excluded).

    A document of L tokens has positions 0..L-1 and sum(2p + 1 for p < L) = L^2, so this reads
    the boundaries the batch already carries: position_ids (restarting at each packed document),
    else each row's real tokens from attention_mask, else each whole row.
    """
    mask = batch.get("attention_mask")
    positions = batch.get("position_ids")
    if positions is None:
        if mask is None:
            rows, length = batch["input_ids"].shape
            return rows * length * length
        positions = mask.long().cumsum(-1) - 1
    terms = 2 * positions.long() + 1
    return int((terms * mask).sum() if mask is not None else terms.sum())


def training_flops(config, tokens: float, attention: float, full_finetune: bool, task: str = "causal_lm") -> float:
    """Model FLOPs of training on `tokens` tokens whose documents have sum(L^2) = `attention`."""
    weights = (6.0 if full_finetune else 4.0) * matmul_parameters(config, task) * tokens
    return weights + 6.0 * config.hidden_size * config.num_hidden_layers * attention


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


def multi_label_macro_f1(preds: list[list[int]], labels: list[list[int]]) -> float:
    """Mean over labels j of the F1 of "label j is on" (rows are 0/1 indicator lists)."""
    if not labels:
        return 0.0
    scores = []
    for j in range(len(labels[0])):
        tp = sum(1 for p, t in zip(preds, labels) if p[j] and t[j])
        fp = sum(1 for p, t in zip(preds, labels) if p[j] and not t[j])
        fn = sum(1 for p, t in zip(preds, labels) if not p[j] and t[j])
        scores.append(_f1(tp, fp, fn))
    return sum(scores) / len(scores)


def mean_squared_error(preds: list[float], labels: list[float]) -> float:
    if not labels:
        return 0.0
    return sum((p - t) ** 2 for p, t in zip(preds, labels)) / len(labels)


def classification_metrics(preds: list, labels: list) -> dict[str, float]:
    """Eval metrics of a sequence-classification head, by the kind of gold label:
    float (regression), list of 0/1 (multi-label) or int (single-label)."""
    if not labels:
        return {}
    first = labels[0]
    if isinstance(first, float):
        return {"eval_mse": mean_squared_error(preds, labels)}
    if isinstance(first, list):
        exact = sum(int(p == t) for p, t in zip(preds, labels)) / len(labels)
        return {"eval_accuracy": exact, "eval_macro_f1": multi_label_macro_f1(preds, labels)}
    return {"eval_accuracy": accuracy(preds, labels), "eval_macro_f1": macro_f1(preds, labels)}


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
