"""Chunked causal-LM loss: equal to the plain full-logits loss, gradients included."""

import pytest
import torch
import torch.nn.functional as F

from persimmon_train.model.loss import chunked_causal_lm_loss, count_targets


def plain_loss(hidden, weight, labels, num_items=None):
    logits = (hidden @ weight.T).float()
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=-100, reduction="sum")
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

    model = PersimmonForCausalLM.from_config(PersimmonConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64))
    ids = torch.randint(0, 300, (2, 20))
    out = model(ids, labels=ids)
    assert out.logits is None and out.loss.requires_grad
    both = model(ids, labels=ids, return_logits=True)
    assert both.logits.shape == (2, 20, 300)
    assert torch.allclose(both.loss, plain_loss(model.model(ids), model.lm_head.weight, ids), atol=1e-6)
