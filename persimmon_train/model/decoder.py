"""The Persimmon decoder: embeddings, N pre-LayerNorm blocks, final LayerNorm.

Module and parameter names are Hugging Face's, so state dicts move between this project,
`transformers` and `peft` with no renaming. Each block is its own module in `layers`, so sharding
(FSDP2 `fully_shard`) and activation checkpointing can wrap them one at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionLayout, attend, build_layout
from .config import PersimmonConfig
from .rope import apply_partial_rope, rotary_cos_sin

_ACTIVATIONS = {
    "relu2": lambda x: torch.square(F.relu(x)),
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype attention will run in: autocast's when it is on, else the activations'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


class KVCache:
    """Keys and values of every layer for incremental decoding ([batch, heads, seq, head_dim])."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class PersimmonAttention(nn.Module):
    def __init__(self, config: PersimmonConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        # One fused projection whose output is [.., heads, 3, head_dim]: q, k, v interleaved per head.
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        if config.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)

    def forward(self, hidden, cos, sin, layout: AttentionLayout, cache: KVCache | None = None):
        batch, seq, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(batch, seq, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.unbind(dim=3)
        if self.config.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        dropout = self.config.attention_dropout if self.training else 0.0
        out = attend(q, k.to(q.dtype), v.to(q.dtype), layout, self.scale, dropout)
        return self.dense(out.transpose(1, 2).reshape(batch, seq, -1))


class PersimmonMLP(nn.Module):
    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class PersimmonDecoderLayer(nn.Module):
    def __init__(self, config: PersimmonConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PersimmonAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = PersimmonMLP(config)
        # As in transformers (and the released config's hidden_dropout), dropout follows the MLP only.
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden, cos, sin, layout: AttentionLayout, cache: KVCache | None = None):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, layout, cache)
        return hidden + self.dropout(self.mlp(self.post_attention_layernorm(hidden)))


class PersimmonModel(nn.Module):
    """The decoder body shared by the three heads; returns final-LayerNorm hidden states."""

    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(PersimmonDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        batch, seq = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(batch, seq)
        hidden = self.embed_tokens(input_ids)
        if hidden.dtype != torch.float32 and torch.is_autocast_enabled(hidden.device.type):
            # Mixed precision keeps the residual stream in float32, also over an embedding held in
            # bf16 (a LoRA run's frozen base): its rows are exact in float32.
            hidden = hidden.float()
        # One layout per forward, shared by every layer (a flex BlockMask, cu_seqlens or segment
        # groups are built here once, not per layer).
        layout = build_layout(
            seq,
            past + seq,
            attention_mask,
            position_ids,
            input_ids.device,
            backend=self.config.attention,
            dtype=_compute_dtype(hidden),
        )
        cos, sin = rotary_cos_sin(self.config, position_ids, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, layout, cache)
        return self.final_layernorm(hidden)
