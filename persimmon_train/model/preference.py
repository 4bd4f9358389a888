"""Preference objectives on packed rows: per-document sums, DPO (sigmoid / IPO) and Bradley-Terry.

A packed preference row marks each token's document in ``doc_ids`` (data/preference.py): ``2k`` is
the k-th pair's chosen, ``2k + 1`` its rejected, -1 padding. Everything here works on ``[B, D]``
per-document tensors (D even, pairs = D / 2 per row), so one forward over the packed rows gives
every pair's numbers. Formulas follow TRL's DPOTrainer.dpo_loss and RewardTrainer:

- logits = (pi_c - pi_r) - (ref_c - ref_r)
- sigmoid: -logsigmoid(beta * logits) * (1 - eps) - logsigmoid(-beta * logits) * eps (eps: label smoothing)
- ipo: (logits - 1 / (2 * beta)) ** 2, on log-probs averaged over each response's tokens
- rewards: beta * (pi - ref) per side; Bradley-Terry: -logsigmoid(s_c - s_r - margin)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loss import IGNORE_INDEX, shift_labels

DPO_LOSSES = ("sigmoid", "ipo")


def num_docs(doc_ids: torch.Tensor) -> int:
    """Documents per row to allocate (even, >= 2): every row's pairs fit."""
    d = int(doc_ids.max()) + 1 if doc_ids.numel() else 0
    return max(2, d + d % 2)


def document_sums(token_values: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor, docs: int):
    """Per-document sums of ``token_values`` (a value per position t for the target labels[t + 1])
    over target positions, and the number of targets: two [B, docs] tensors."""
    target_doc = shift_labels(doc_ids)  # the document of the token a position predicts
    keep = (shift_labels(labels) != IGNORE_INDEX) & (target_doc >= 0)
    index = torch.where(keep, target_doc, 0)
    zeros = torch.zeros(labels.shape[0], docs, dtype=torch.float32, device=labels.device)
    sums = zeros.scatter_add(1, index, torch.where(keep, token_values.float(), 0.0))
    counts = zeros.scatter_add(1, index, keep.float())
    return sums, counts


def document_last(doc_ids: torch.Tensor, docs: int, input_ids=None, pad_token_id=None) -> torch.Tensor:
    """Index of each document's last token, [B, docs] (-1 where a row has fewer documents).

    With `pad_token_id`: the last token that is not the pad token, transformers' rule for
    PersimmonForSequenceClassification (where pad = eos, as in the released tokenizer, that is the
    token before the eos), so an exported reward model scores a response where it was trained to.
    """
    pos = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    out = torch.full((doc_ids.shape[0], docs), -1, dtype=torch.long, device=doc_ids.device)
    real = doc_ids >= 0
    if pad_token_id is not None:
        real = real & (input_ids != pad_token_id)
    return out.scatter_reduce(1, torch.where(real, doc_ids, 0), torch.where(real, pos, -1), reduce="amax")


def pairs(per_doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, D] per-document values -> (chosen, rejected), each [B, D / 2]."""
    return per_doc[:, 0::2], per_doc[:, 1::2]


def pair_mask(doc_ids: torch.Tensor, docs: int) -> torch.Tensor:
    """[B, docs / 2] bool: which pair slots of each row hold a pair."""
    return pairs(document_last(doc_ids, docs))[0] >= 0


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the (detached) chosen / rejected rewards."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss: {loss_type!r} is not one of {', '.join(DPO_LOSSES)}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: float = 0.0):
    """Per-pair reward-model loss: -log sigmoid(s_chosen - s_rejected - margin)."""
    return -F.logsigmoid(chosen_scores - rejected_scores - margin)
