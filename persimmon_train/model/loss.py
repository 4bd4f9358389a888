"""Causal-LM loss computed in chunks through the LM head.

With a 262144-token vocabulary the float32 logits of one 16K row are 16 GiB, and autograd would
keep them (plus their softmax) alive until backward. Here the tokens are cut into chunks; each
chunk's `lm_head` matmul + cross-entropy runs under activation checkpointing, so only the chunk's
hidden states are saved and its logits are rebuilt, one chunk at a time, during backward. Peak
memory is one chunk of logits instead of all of them; the price is one extra `lm_head` forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF convention: logits at position t predict labels[t + 1]; the last position predicts nothing."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def count_targets(labels: torch.Tensor) -> int:
    """Number of tokens the causal-LM loss is taken over (after the shift)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Shifted cross-entropy of `hidden @ lm_head_weight.T` against `labels`.

    hidden: [batch, seq, hidden]; labels: [batch, seq] (unshifted, -100 = ignore).
    Returns sum / num_items_in_batch when that is given (the trainer passes the number of target
    tokens in the whole global batch), else the mean over this batch's target tokens.
    """
    targets = shift_labels(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    keep = targets != IGNORE_INDEX
    # Positions without a target cost nothing: drop them before the big matmul.
    if not bool(keep.all()):
        index = keep.nonzero().squeeze(-1)
        flat, targets = flat.index_select(0, index), targets.index_select(0, index)
    if targets.shape[0] == 0:
        # Nothing to predict: a zero that still connects to the graph, so backward() works.
        return hidden.sum().float() * 0.0
    total = flat.new_zeros((), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and (flat.requires_grad or lm_head_weight.requires_grad)
    for start in range(0, targets.shape[0], chunk_size):
        h, t = flat[start:start + chunk_size], targets[start:start + chunk_size]
        if needs_grad:
            total = total + checkpoint(_chunk_loss_sum, h, lm_head_weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, lm_head_weight, t)
    if num_items_in_batch is None:
        denominator = max(targets.shape[0], 1)
    else:
        denominator = num_items_in_batch
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator
