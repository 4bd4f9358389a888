"""Causal-LM loss fused with the LM head: one chunk of logits at a time, the head run once.

With a 262144-token vocabulary the float32 logits of one 16K row are 16 GiB, and autograd would
keep them (plus their softmax) alive until backward. Here the target tokens are cut into chunks,
and for each chunk the forward pass computes its logits, its loss, and right away the gradient of
that loss with respect to the chunk's hidden states and the head's weight (softmax - one-hot, then
two matmuls), as Liger's fused linear cross-entropy and torchtitan's chunked loss do. Only the two
gradients are kept; the chunk's logits are freed before the next chunk. Backward then just scales
the stored gradients by the incoming gradient (a scalar). Peak memory: one chunk of float32 logits
(capped at `LOGITS_CHUNK_BYTES`) plus a weight-sized gradient accumulator; matmuls: three per token,
the same as an unfused head + cross-entropy (the former checkpointed chunked loss needed four).

Gradient contract (parallel/base.py): the loss is sum / `num_items_in_batch` (the trainer passes
the number of target tokens in the whole global batch), else the mean over this batch's targets.
The stored gradients already carry that 1 / denominator.

The loss must run inside `LMHead.forward` (heads.py): FSDP2 and DeepSpeed ZeRO-3 gather a module's
weight around its own forward only, and this is where the weight is read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# A chunk's float32 logits stay below this (256 tokens at vocab 262144): bounds the peak on top of
# the weight-sized gradient, while each chunk's matmuls stay large enough to run at full speed.
LOGITS_CHUNK_BYTES = 256 * 2**20


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF convention: logits at position t predict labels[t + 1]; the last position predicts nothing."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def count_targets(labels: torch.Tensor) -> int:
    """Number of tokens the causal-LM loss is taken over (after the shift)."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What the head's matmuls run in: autocast's dtype when it is on (as an nn.Linear would)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, targets_i) * scale, gradients computed in forward, chunk by chunk.

    hidden: [n, h] (every row has a valid target); weight: [vocab, h]; targets: [n].
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk_size: int, need_hidden: bool, need_weight: bool):
        dtype = _matmul_dtype(hidden, weight)
        w = weight.to(dtype)  # cast once, not once per chunk (autocast would cast per call)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulated in the matmul dtype with addmm_ (no weight-sized temporary per chunk).
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        n = hidden.shape[0]
        # Two buffers reused by every chunk: a fresh [chunk, vocab] tensor per chunk would be a fresh
        # mmap on CPU (page faults on every touch) and allocator churn on GPU.
        logits_buf = torch.empty((min(chunk_size, n), weight.shape[0]), dtype=torch.float32, device=hidden.device)
        low_buf = torch.empty_like(logits_buf, dtype=dtype) if dtype != torch.float32 else None
        log_scale = torch.log(scale)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)
                t = targets[start : start + chunk_size]
                rows = torch.arange(t.shape[0], device=t.device)
                logits = logits_buf[: t.shape[0]]
                if low_buf is None:
                    torch.mm(h, w.t(), out=logits)
                else:
                    logits.copy_(torch.mm(h, w.t(), out=low_buf[: t.shape[0]]))
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits[rows, t]).sum()
                if not (need_hidden or need_weight):
                    continue
                # d(scale * sum CE)/d logits = scale * (softmax - one_hot), built in place:
                # exp(logits - lse + log(scale)) is scale * softmax in one pass.
                grad_logits = logits.sub_((lse - log_scale)[:, None]).exp_()
                grad_logits[rows, t] -= scale
                if low_buf is not None:
                    grad_logits = low_buf[: t.shape[0]].copy_(grad_logits)
                if need_hidden:
                    grad_hidden[start : start + chunk_size] = grad_logits @ w  # [chunk, hidden]: small
                if need_weight:
                    grad_weight.addmm_(grad_logits.t(), h)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output.to(grad_weight.dtype)).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Shifted cross-entropy of `hidden @ lm_head_weight.T` against `labels`, fused with the head.

    hidden: [batch, seq, hidden]; labels: [batch, seq] (unshifted, -100 = ignore).
    Returns sum / num_items_in_batch when that is given (the trainer passes the number of target
    tokens in the whole global batch), else the mean over this batch's target tokens.
    `chunk_size` caps the tokens per chunk (LOGITS_CHUNK_BYTES caps it further for big vocabularies).
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
    denominator = targets.shape[0] if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(denominator):
        scale = 1.0 / denominator.to(device=flat.device, dtype=torch.float32)
    else:
        scale = torch.tensor(1.0 / denominator, dtype=torch.float32, device=flat.device)
    vocab = lm_head_weight.shape[0]
    chunk = max(1, min(chunk_size, LOGITS_CHUNK_BYTES // (4 * vocab)))
    grad_on = torch.is_grad_enabled()
    return FusedLinearCrossEntropy.apply(
        flat,
        lm_head_weight,
        targets,
        scale,
        chunk,
        grad_on and flat.requires_grad,
        grad_on and lm_head_weight.requires_grad,
    )


class FusedLinearTokenLogps(torch.autograd.Function):
    """log_softmax(hidden_i @ weight.T)[targets_i] for every row, chunk by chunk: [n] float32.

    hidden: [n, h]; weight: [vocab, h]; targets: [n]. Forward keeps only each row's logsumexp;
    backward recomputes one chunk's logits at a time into two reused buffers, like
    `FusedLinearCrossEntropy`, so no [chunk, vocab] tensor outlives its chunk (preference tuning
    needs per-token values, which the fused cross-entropy sums away).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        dtype = _matmul_dtype(hidden, weight)
        w = weight.to(dtype)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        logits_buf = torch.empty((min(chunk_size, n), weight.shape[0]), dtype=torch.float32, device=hidden.device)
        low_buf = torch.empty_like(logits_buf, dtype=dtype) if dtype != torch.float32 else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                logits = _chunk_logits(hidden[start : start + chunk_size].to(dtype), w, logits_buf, low_buf)
                t = targets[start : start + chunk_size]
                lse = torch.logsumexp(logits, dim=-1)
                lse_all[start : start + chunk_size] = lse
                out[start : start + chunk_size] = logits[torch.arange(t.shape[0], device=t.device), t] - lse
        ctx.save_for_backward(hidden, weight, targets, lse_all)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse_all = ctx.saved_tensors
        chunk_size, dtype = ctx.chunk_size, ctx.dtype
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        n = hidden.shape[0]
        logits_buf = torch.empty((min(chunk_size, n), weight.shape[0]), dtype=torch.float32, device=hidden.device)
        low_buf = torch.empty_like(logits_buf, dtype=dtype) if dtype != torch.float32 else None
        grad_out = grad_out.float()
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                h = hidden[start : start + chunk_size].to(dtype)
                t = targets[start : start + chunk_size]
                g = grad_out[start : start + chunk_size]
                logits = _chunk_logits(h, w, logits_buf, low_buf)
                # d logp_t / d logits = one_hot(t) - softmax, times the incoming gradient, in place.
                grad_logits = logits.sub_(lse_all[start : start + chunk_size, None]).exp_().mul_(-g[:, None])
                grad_logits[torch.arange(t.shape[0], device=t.device), t] += g
                if low_buf is not None:
                    grad_logits = low_buf[: t.shape[0]].copy_(grad_logits)
                if need_hidden:
                    grad_hidden[start : start + chunk_size] = grad_logits @ w
                if need_weight:
                    grad_weight.addmm_(grad_logits.t(), h)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, logits_buf: torch.Tensor, low_buf: torch.Tensor | None):
    """h @ w.T into the reused float32 buffer (through the low-precision one when the matmul is)."""
    logits = logits_buf[: h.shape[0]]
    if low_buf is None:
        return torch.mm(h, w.t(), out=logits)
    return logits.copy_(torch.mm(h, w.t(), out=low_buf[: h.shape[0]]))


def causal_token_logps(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """log p(labels[t + 1] | tokens ..t) at every position t with a target, 0 elsewhere: [batch, seq] float32.

    For preference tuning (per-document sums of response log-probs). Only positions with a target
    reach the head, through `FusedLinearTokenLogps`: no logits stay alive between forward and
    backward and at most one chunk's exists at a time (bench/dpo_memory.py).
    """
    targets = shift_labels(labels)
    keep = targets != IGNORE_INDEX
    out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    index = keep.reshape(-1).nonzero().squeeze(-1)
    if index.numel() == 0:
        return out + hidden.sum().float() * 0.0  # connected to the graph, so backward() works
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    tgt = targets.reshape(-1).index_select(0, index)
    chunk = max(1, min(chunk_size, LOGITS_CHUNK_BYTES // (4 * lm_head_weight.shape[0])))
    logps = FusedLinearTokenLogps.apply(flat, lm_head_weight, tgt, chunk)
    return out.reshape(-1).index_put((index,), logps).reshape(labels.shape)
