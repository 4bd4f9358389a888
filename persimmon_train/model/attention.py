"""Attention backends and the masks they need.

The decoder describes *what* may attend to what once per forward (`AttentionLayout`: causal,
padding, document boundaries of packed rows, cached prefix); a backend turns that into a kernel
call. The CPU/default backend is SDPA with an explicit boolean mask when one is needed, and the
plain `is_causal=True` fast path when it is not. GPU backends (flex attention, flash varlen) plug in
here by implementing `attend`.

Packed rows: a row holds several documents back to back; `position_ids` restart at 0 where each new
document begins. Token t may attend to token s only if s <= t, both lie in the same document, and s
is not padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of each token: a new document starts wherever position_ids == 0."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


def is_packed(position_ids: torch.Tensor | None) -> bool:
    """True if some row restarts its positions at 0 after its first token (several documents)."""
    if position_ids is None or position_ids.shape[-1] < 2:
        return False
    return bool((position_ids[..., 1:] == 0).any())


@dataclass
class AttentionLayout:
    """What each query may see. `mask` is None exactly when plain causal attention suffices."""

    mask: torch.Tensor | None  # bool [batch, 1, q_len, kv_len], True = may attend
    is_causal: bool


def build_layout(
    q_len: int,
    kv_len: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    device: torch.device,
) -> AttentionLayout:
    """Combine causality, key padding and document boundaries into one layout.

    `attention_mask` is the usual [batch, kv_len] 1/0 padding mask (left or right padding).
    Queries are the last `q_len` of the `kv_len` positions (a KV cache holds the rest).
    Document boundaries are taken from `position_ids` only without a cache (training, scoring).
    """
    past = kv_len - q_len
    pad = attention_mask is not None and not bool(attention_mask.all())
    packed = past == 0 and is_packed(position_ids)
    if not pad and not packed:
        # q_len == 1 with a cache: the one query sees everything; otherwise plain causal.
        if q_len == 1 or past == 0:
            return AttentionLayout(mask=None, is_causal=q_len > 1)
    q_pos = torch.arange(past, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, q, kv]
    if pad:
        allowed = allowed & attention_mask[:, None, None, :].bool()
    if packed:
        docs = document_ids(position_ids)
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])
    # A query whose every key is masked (left padding) would get NaN from softmax, and NaN values
    # at padding positions would then leak through 0-weights into real tokens. Let every query
    # see itself: real tokens always could, padding rows get a harmless finite value.
    allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None, None]
    return AttentionLayout(mask=allowed, is_causal=False)


def sdpa_attend(q, k, v, layout: AttentionLayout, scale: float, dropout_p: float = 0.0):
    """q, k, v: [batch, heads, seq, head_dim]. Returns [batch, heads, q_len, head_dim]."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=layout.mask, is_causal=layout.is_causal and layout.mask is None,
        dropout_p=dropout_p, scale=scale)


BACKENDS = {"sdpa": sdpa_attend}
