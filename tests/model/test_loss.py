"""Chunked causal-LM loss: equal to the plain full-logits loss, gradients included."""

import pytest
import torch
import torch.nn.functional as F

from persimmon_train.model.loss import causal_token_logps, chunked_causal_lm_loss, count_targets


def plain_loss(hidden, weight, labels, num_items=None):
    logits = (hidden @ weight.T).float()
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total / (num_items if num_items is not None else (targets != -100).sum())


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
@pytest.mark.parametrize("num_items", [None, 37])
def test_chunked_loss_and_grads_equal_plain(chunk, num_items):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 50, 32, generator=g, dtype=torch.float64).float()
    weight = torch.randn(500, 32, generator=g) * 0.2
    labels = torch.randint(0, 500, (3, 50), generator=g)
    labels[0, :20] = -100
    labels[2, 45:] = -100
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    a = chunked_causal_lm_loss(h1, w1, labels, chunk_size=chunk, num_items_in_batch=num_items)
    b = plain_loss(h2, w2, labels, num_items)
    a.backward()
    b.backward()
    assert abs(a.item() - b.item()) <= 1e-5 * max(1.0, abs(b.item()))
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6, rtol=1e-5)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-6, rtol=1e-5)


def test_count_targets_and_all_ignored():
    labels = torch.tensor([[5, -100, 3, 4], [-100, -100, -100, -100]])
    assert count_targets(labels) == 2  # 3 and 4 (the first column is never a target)
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss = chunked_causal_lm_loss(hidden, torch.randn(10, 8), labels[1:])
    loss.backward()  # a zero loss that still backpropagates, not NaN
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0)


def test_model_loss_does_not_materialise_full_logits():
    """The model returns no logits with labels (unless asked), so nothing holds [tokens, vocab]."""
    from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM

    model = PersimmonForCausalLM.from_config(
        PersimmonConfig(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    )
    ids = torch.randint(0, 300, (2, 20))
    out = model(ids, labels=ids)
    assert out.logits is None and out.loss.requires_grad
    both = model(ids, labels=ids, return_logits=True)
    assert both.logits.shape == (2, 20, 300)
    assert torch.allclose(both.loss, plain_loss(model.model(ids), model.lm_head.weight, ids), atol=1e-6)


# ---------------------------------------------------------------------------- fused linear + CE


def test_fused_loss_and_grads_equal_transformers():
    """Whole model, fused loss vs transformers' full-logits loss: loss and every gradient (fp32)."""
    from tests.helpers import parity_config, twins

    ours, hf = twins(parity_config())
    ids = torch.randint(1, 160, (2, 30), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :7] = -100
    labels[1, 20:] = -100
    ours.loss_chunk_size = 8  # several chunks
    a = ours(ids, labels=labels).loss
    b = hf(ids, labels=labels).loss
    a.backward()
    b.backward()
    assert abs(a.item() - b.item()) <= 1e-5
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, theirs[name].grad, atol=1e-5, rtol=1e-4), name


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op name, largest output numel) of every aten op run under it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        numel = max((o.numel() for o in outs if isinstance(o, torch.Tensor)), default=0)
        self.ops.append((func.__name__, numel))
        return out


def test_one_chunk_of_logits_and_no_head_matmul_in_backward(monkeypatch):
    import persimmon_train.model.loss as loss_mod

    vocab, dim, tokens = 1000, 16, 200
    monkeypatch.setattr(loss_mod, "LOGITS_CHUNK_BYTES", 4 * vocab * 24)  # 24-token chunks
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, dim, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, dim, generator=g) * 0.1).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    with _OpRecorder() as fwd:
        loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=1024)
    with _OpRecorder() as bwd:
        loss.backward()
    biggest = max(n for _, n in fwd.ops)
    assert biggest <= 24 * vocab, biggest  # one chunk of logits (the weight gradient is 16 * vocab)
    assert not [op for op, _ in bwd.ops if op.startswith(("mm", "addmm", "bmm", "matmul"))]
    # and the result is still right
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    plain_loss(h2, w2, labels).backward()
    assert torch.allclose(hidden.grad, h2.grad, atol=1e-6, rtol=1e-5)
    assert torch.allclose(weight.grad, w2.grad, atol=1e-6, rtol=1e-5)


def test_frozen_head_and_no_grad():
    """LoRA freezes lm_head: no weight gradient is built; under no_grad no gradient at all."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 10, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 50, (2, 10), generator=g)
    loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=4)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None
    with torch.no_grad():
        value = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=4)
    assert not value.requires_grad and abs(value.item() - loss.item()) <= 1e-6


def test_loss_scale_contract_with_tensor_count():
    """sum / num_items_in_batch (a tensor, as the trainer passes it), gradients scaled the same way."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 12, 8, generator=g)
    weight = torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 40, (1, 12), generator=g)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    a = chunked_causal_lm_loss(h1, weight, labels, chunk_size=5, num_items_in_batch=torch.tensor(33))
    (a * 3.0).backward()  # an upstream factor must reach the stored gradients
    b = plain_loss(h2, weight, labels, 33)
    (b * 3.0).backward()
    assert abs(a.item() - b.item()) <= 1e-6
    assert torch.allclose(h1.grad, h2.grad, atol=1e-7, rtol=1e-5)


def test_autocast_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 64, 32, generator=g)
    weight = torch.randn(300, 32, generator=g) * 0.1
    labels = torch.randint(0, 300, (1, 64), generator=g)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = chunked_causal_lm_loss(h1, w1, labels, chunk_size=16)
    a.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain_loss(h2, w2, labels).backward()
    assert w1.grad.dtype == torch.float32 and h1.grad.dtype == torch.float32
    assert abs(a.item() - plain_loss(hidden, weight, labels).item()) < 2e-2
    assert torch.allclose(w1.grad, w2.grad, atol=2e-3, rtol=5e-2)


@pytest.mark.parametrize("chunk", [7, 1024])
def test_token_logps_and_grads_equal_plain_log_softmax(chunk):
    """causal_token_logps (fused with the head, chunked) = log_softmax of the plain head, and so do
    the gradients of a weighted sum of them (preference tuning's per-document sums)."""
    torch.manual_seed(0)
    h0, w0 = torch.randn(2, 40, 32, dtype=torch.float64), torch.randn(300, 32, dtype=torch.float64) * 0.3
    labels = torch.randint(0, 300, (2, 40))
    labels[:, :5] = -100
    weights = torch.linspace(-1, 2, 2 * 39, dtype=torch.float64).reshape(2, 39)
    grads = []
    for fused in (True, False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        if fused:
            logps = causal_token_logps(h.float(), w.float(), labels, chunk_size=chunk)[:, :-1].double()
        else:
            targets = labels[:, 1:]
            logps = torch.log_softmax(h[:, :-1] @ w.t(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            logps = logps * (targets != -100)
        (logps * weights).sum().backward()
        grads.append((logps.detach(), h.grad, w.grad))
    for got, want in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
