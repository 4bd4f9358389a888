"""Rotary position embedding on the first `rotary_dim` dims of each head (partial RoPE).

Frequencies are computed per forward from the config instead of living in a buffer: they are a
few dozen floats, and with no buffer a model built on the meta device needs nothing re-initialised
after its weights are loaded.
"""

from __future__ import annotations

import torch

from .config import PersimmonConfig


def inverse_frequencies(config: PersimmonConfig, seq_len: int, device=None) -> torch.Tensor:
    """inv_freq for `seq_len` positions, following transformers' rope types exactly.

    - default: base ** (-2i / dim)
    - linear: positions divided by `factor` (same as dividing inv_freq by it)
    - dynamic (NTK): once the sequence runs past `max_position_embeddings`, the base grows as
      base * ((factor * L / max_pos) - (factor - 1)) ** (dim / (dim - 2)); shorter sequences keep
      the original frequencies.
    """
    dim = config.rotary_dim
    base = config.rope_theta
    scaling = config.rope_scaling or {}
    kind, factor = scaling.get("type"), scaling.get("factor", 1.0)
    max_pos = config.max_position_embeddings
    if kind == "dynamic" and seq_len > max_pos:
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base**exponents)
    if kind == "linear":
        inv_freq = inv_freq / factor
    return inv_freq


def rotary_cos_sin(config: PersimmonConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin of shape [batch, seq, rotary_dim], computed in float32 then cast to `dtype`."""
    seq_len = int(position_ids.max().item()) + 1 if position_ids.numel() else 1
    inv_freq = inverse_frequencies(config, seq_len, device=position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x ([batch, heads, seq, head_dim]); pass the rest."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    x_rot = x_rot * cos + _rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1)
