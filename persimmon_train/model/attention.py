"""Attention backends and the one layout they all read.

The decoder describes *what* may attend to what once per forward (`build_layout` -> an
`AttentionLayout`: causal, padding, document boundaries of packed rows, cached prefix), and every
layer hands that same layout to `attend`, which calls the backend's kernel. Anything a backend
needs that depends only on the batch (a dense mask, segment groups, `cu_seqlens`, a flex
`BlockMask`) is built here once, not once per layer.

Packed rows: a row holds several documents back to back; `position_ids` restart at 0 where each new
document begins. Token t may attend to token s only if s <= t, both lie in the same document, and s
is not padding.

Backends (`model.attention`):
- `sdpa`: `F.scaled_dot_product_attention` with a boolean [batch, 1, q, kv] mask when rows are
  packed or padded (the reference; it computes every block of the square), plain `is_causal`
  otherwise.
- `segments`: document-aware SDPA for CPUs. Each row is split at document starts; consecutive
  short documents are merged into groups of up to `SEGMENT_TILE` tokens (bounding the number of
  kernel calls), groups of equal length across the whole batch are stacked and run as one SDPA
  call (causal, or with the group's small block-diagonal mask). Work is the sum over groups of
  their squares instead of seq**2, so a 16K row of 512-token documents costs what 1K rows do.
- `flex`: FlexAttention with a `BlockMask` (causal AND same document) built once per forward;
  compiled on CUDA. Forward-only on CPU (torch has no CPU backward for it).
- `varlen`: `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10) or flash-attn's
  `flash_attn_varlen_func`, over the batch flattened to one token stream with `cu_seqlens` at
  document starts. CUDA only (no CPU kernel), half precision only.
- `auto`: unpacked rows -> `sdpa` (its causal path is already the flash kernel on GPUs); packed
  rows -> `varlen` on CUDA in bf16/fp16 when available, else `flex` on CUDA, else `segments`.

Padding masks (`attention_mask` with zeros) and KV-cache decoding always use `sdpa`: they come
from evaluation and generation, not from packed training rows (whose padding is its own
"document", so it needs no mask).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from persimmon_train.errors import ConfigError

from .config import ATTENTION_BACKENDS

# Consecutive documents shorter than this are attended as one group with a block-diagonal mask:
# the waste is bounded by a tile's square, the number of SDPA calls by seq / SEGMENT_TILE.
SEGMENT_TILE = 256


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
    """What each query may see, in the form the chosen backend wants.

    `mask` (sdpa) is None exactly when plain causal attention suffices. The other fields are
    filled only for their backend.
    """

    mask: torch.Tensor | None  # bool [batch, 1, q_len, kv_len], True = may attend
    is_causal: bool
    backend: str = "sdpa"
    # segments: buckets of equal-length groups as (length, number of groups, bool mask [n, 1, L, L]
    # or None when every group is one document), in the order their tokens are gathered; `order`
    # gathers the batch's tokens bucket by bucket and `inverse` puts them back (None: identity).
    buckets: list[tuple[int, int, torch.Tensor | None]] = field(default_factory=list)
    order: torch.Tensor | None = None
    inverse: torch.Tensor | None = None
    # varlen
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    # flex
    block_mask: Any = None


# ---------------------------------------------------------------------------- availability


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_available(device: torch.device) -> bool:
    return device.type == "cuda" and (_torch_varlen() is not None or _flash_attn_varlen() is not None)


@functools.cache
def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return create_block_mask, flex_attention


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, packed: bool) -> str:
    """The backend `name` stands for on this device (`auto` -> a concrete one)."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"model.attention: {name!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if name != "auto":
        return name
    if not packed:
        return "sdpa"
    if device.type == "cuda":
        if dtype in (torch.bfloat16, torch.float16) and varlen_available(device):
            return "varlen"
        if _flex() is not None:
            return "flex"
        return "sdpa"
    return "segments"


# ---------------------------------------------------------------------------- layout


def _dense_mask(q_len, kv_len, attention_mask, position_ids, packed, pad, device) -> torch.Tensor:
    past = kv_len - q_len
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
    return allowed | (k_pos[None, :] == q_pos[:, None])[None, None]


def _group_documents(lengths: list[int], tile: int) -> list[list[int]]:
    """Merge consecutive documents into groups of <= tile tokens (a longer document stands alone)."""
    groups: list[list[int]] = []
    for n in lengths:
        if groups and n < tile and sum(groups[-1]) + n <= tile:
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def _block_causal(doc_lengths: list[int], device) -> torch.Tensor:
    """[L, L] bool: causal within each of the consecutive documents, nothing across them."""
    docs = torch.repeat_interleave(
        torch.arange(len(doc_lengths), device=device), torch.tensor(doc_lengths, device=device)
    )
    n = docs.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return causal & (docs[:, None] == docs[None, :])


def _segments_layout(position_ids: torch.Tensor, tile: int) -> AttentionLayout:
    batch, seq = position_ids.shape
    device = position_ids.device
    starts = position_ids == 0
    starts[:, 0] = True
    groups = []  # (first token in the flattened batch, document lengths)
    for b, row in enumerate(starts.cpu()):
        idx = row.nonzero().squeeze(-1).tolist() + [seq]
        first = b * seq + idx[0]
        for docs in _group_documents([e - a for a, e in zip(idx[:-1], idx[1:])], tile):
            groups.append((first, docs))
            first += sum(docs)
    by_length: dict[int, list[tuple[int, list[int]]]] = {}
    for g in groups:
        by_length.setdefault(sum(g[1]), []).append(g)
    buckets, order = [], []
    for length, members in sorted(by_length.items(), key=lambda kv: kv[1][0][0]):
        if all(len(docs) == 1 for _, docs in members):
            mask = None
        else:
            mask = torch.stack([_block_causal(docs, device) for _, docs in members])[:, None]
        buckets.append((length, len(members), mask))
        order.extend(range(first, first + length) for first, _ in members)
    flat_order = torch.tensor([i for r in order for i in r], dtype=torch.long)
    if torch.equal(flat_order, torch.arange(batch * seq)):
        return AttentionLayout(mask=None, is_causal=True, backend="segments", buckets=buckets)
    inverse = torch.empty_like(flat_order)
    inverse[flat_order] = torch.arange(batch * seq)
    return AttentionLayout(
        mask=None,
        is_causal=True,
        backend="segments",
        buckets=buckets,
        order=flat_order.to(device),
        inverse=inverse.to(device),
    )


def _varlen_layout(position_ids: torch.Tensor) -> AttentionLayout:
    batch, seq = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    flat = starts.reshape(-1).nonzero().squeeze(-1)
    cu = torch.cat((flat, torch.tensor([batch * seq], device=flat.device))).to(torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max().item())
    return AttentionLayout(mask=None, is_causal=True, backend="varlen", cu_seqlens=cu, max_seqlen=max_seqlen)


def _flex_layout(position_ids: torch.Tensor) -> AttentionLayout:
    create_block_mask, _ = _flex()
    batch, seq = position_ids.shape
    docs = document_ids(position_ids)

    def causal_same_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    kwargs = {}
    if position_ids.device.type == "cuda" and "_compile" in inspect.signature(create_block_mask).parameters:
        kwargs["_compile"] = True  # the uncompiled builder materialises [batch, seq, seq]
    block_mask = create_block_mask(causal_same_document, batch, None, seq, seq, device=position_ids.device, **kwargs)
    return AttentionLayout(mask=None, is_causal=True, backend="flex", block_mask=block_mask)


def build_layout(
    q_len: int,
    kv_len: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    device: torch.device,
    backend: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> AttentionLayout:
    """Combine causality, key padding and document boundaries into one layout for `backend`.

    `attention_mask` is the usual [batch, kv_len] 1/0 padding mask (left or right padding).
    Queries are the last `q_len` of the `kv_len` positions (a KV cache holds the rest).
    Document boundaries are taken from `position_ids` only without a cache (training, scoring).
    `dtype` is the compute dtype (what `auto` needs to know whether flash kernels apply).
    """
    past = kv_len - q_len
    pad = attention_mask is not None and not bool(attention_mask.all())
    packed = past == 0 and is_packed(position_ids)
    name = resolve_backend(backend, torch.device(device), dtype, packed)
    # Without position_ids the batch size is unknown here; the decoder always passes them.
    if name != "sdpa" and past == 0 and not pad and position_ids is not None:
        if name == "segments":
            return _segments_layout(position_ids, SEGMENT_TILE)
        if name == "varlen":
            return _varlen_layout(position_ids)
        if name == "flex":
            if _flex() is None:
                raise ConfigError("model.attention: flex needs torch.nn.attention.flex_attention (torch >= 2.5)")
            return _flex_layout(position_ids)
    if not pad and not packed:
        # q_len == 1 with a cache: the one query sees everything; otherwise plain causal.
        if q_len == 1 or past == 0:
            return AttentionLayout(mask=None, is_causal=q_len > 1)
    return AttentionLayout(
        mask=_dense_mask(q_len, kv_len, attention_mask, position_ids, packed, pad, device), is_causal=False
    )


# ---------------------------------------------------------------------------- kernels


def sdpa_attend(q, k, v, layout: AttentionLayout, scale: float, dropout_p: float = 0.0):
    """q, k, v: [batch, heads, seq, head_dim]. Returns [batch, heads, q_len, head_dim]."""
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=layout.mask,
        is_causal=layout.is_causal and layout.mask is None,
        dropout_p=dropout_p,
        scale=scale,
    )


@torch.compiler.disable  # a Python loop over this batch's groups: compiling it would recompile per batch
def segments_attend(q, k, v, layout: AttentionLayout, scale: float, dropout_p: float = 0.0):
    """One SDPA call per bucket of equal-length groups (stacked as a batch).

    The batch is flattened to one [tokens, heads, dim] stream (the layout the fused qkv projection
    produced), so a group is a contiguous block: with documents in bucket order (always the case
    when all groups differ in length or all are equal) buckets are `split` views and outputs one
    `cat`; otherwise one `index_select` gathers and one puts back. split/cat/index_select keep
    backward to one op each, never a zero-filled full-size gradient per slice.
    """
    batch, heads, seq, dim = q.shape
    sizes = [length * n for length, n, _ in layout.buckets]
    pieces = []
    for t in (q, k, v):
        flat = t.transpose(1, 2).reshape(batch * seq, heads, dim)
        if layout.order is not None:
            flat = flat.index_select(0, layout.order)
        pieces.append(flat.split(sizes, dim=0))
    outs = []
    for (length, n, mask), qb, kb, vb in zip(layout.buckets, *pieces):
        qb, kb, vb = (p.view(n, length, heads, dim).transpose(1, 2) for p in (qb, kb, vb))
        out = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p, scale=scale
        )
        outs.append(out.transpose(1, 2).reshape(n * length, heads, dim))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    if layout.inverse is not None:
        out = out.index_select(0, layout.inverse)
    return out.view(batch, seq, heads, dim).transpose(1, 2)


def _no_dropout(name: str, dropout_p: float) -> None:
    if dropout_p > 0:
        raise ConfigError(
            f"model.attention={name} has no attention dropout; set model.attention_dropout=0 "
            f"or model.attention=sdpa|segments"
        )


@functools.cache
def _compiled_flex():
    _, flex_attention = _flex()
    return torch.compile(flex_attention, dynamic=False)


def flex_attend(q, k, v, layout: AttentionLayout, scale: float, dropout_p: float = 0.0):
    _no_dropout("flex", dropout_p)
    # Eager flex is a slow reference implementation; on CUDA the compiled kernel is the point.
    fn = _compiled_flex() if q.device.type == "cuda" else _flex()[1]
    return fn(q, k, v, block_mask=layout.block_mask, scale=scale)


@functools.cache
def _varlen_signature() -> tuple[dict, bool]:
    """(causal kwargs, accepts scale): torch's varlen_attn spelled causality `is_causal=True` (2.10
    docs), later `window_size=(-1, 0)`; read the installed signature instead of guessing."""
    params = inspect.signature(_torch_varlen()).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        raise RuntimeError(
            f"torch.nn.attention.varlen.varlen_attn{inspect.signature(_torch_varlen())}: "
            f"no is_causal or window_size argument"
        )
    return causal, "scale" in params


def varlen_attend(q, k, v, layout: AttentionLayout, scale: float, dropout_p: float = 0.0):
    _no_dropout("varlen", dropout_p)
    batch, heads, seq, head_dim = q.shape
    # [batch, heads, seq, dim] -> one token stream [batch * seq, heads, dim]
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, heads, head_dim) for t in (q, k, v))
    cu, n = layout.cu_seqlens, layout.max_seqlen
    if _torch_varlen() is not None:
        causal, takes_scale = _varlen_signature()
        if takes_scale:
            causal = {**causal, "scale": scale}
        elif abs(scale - head_dim**-0.5) > 1e-12:
            raise RuntimeError("this torch's varlen_attn has no scale argument; only head_dim ** -0.5 is possible")
        out = _torch_varlen()(q, k, v, cu, cu, n, n, **causal)
    elif _flash_attn_varlen() is not None:
        out = _flash_attn_varlen()(q, k, v, cu, cu, n, n, dropout_p=0.0, softmax_scale=scale, causal=True)
    else:
        raise ConfigError("model.attention=varlen needs torch >= 2.10 (torch.nn.attention.varlen) or flash-attn")
    return out.view(batch, seq, heads, head_dim).transpose(1, 2)


BACKENDS = {"sdpa": sdpa_attend, "segments": segments_attend, "flex": flex_attend, "varlen": varlen_attend}


def attend(q, k, v, layout: AttentionLayout, scale: float, dropout_p: float = 0.0):
    """Run the layout's backend. q, k, v: [batch, heads, seq, head_dim] -> same shape as q."""
    return BACKENDS[layout.backend](q, k, v, layout, scale, dropout_p)
