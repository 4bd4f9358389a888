"""Every attention backend equals the SDPA reference on packed rows (forward and gradients).

CPU limits (docs/DESIGN.md "Testing here"): flex has no CPU backward, so only its forward is
checked here; varlen has no CPU kernel at all. bench/gpu.sh checks both fully on a GPU.
"""

import pytest
import torch

from persimmon_train.errors import ConfigError
from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM
from persimmon_train.model.attention import SEGMENT_TILE, build_layout, resolve_backend
from tests.helpers import parity_config, randomize

CPU = torch.device("cpu")


def packed_rows(row_lengths, seed=0, vocab=160):
    """A batch of packed rows: position_ids restart at 0 at each document."""
    pos = torch.stack([torch.cat([torch.arange(n) for n in lens]) for lens in row_lengths])
    ids = torch.randint(1, vocab, pos.shape, generator=torch.Generator().manual_seed(seed))
    return ids, pos


# Mixed lengths: short documents merged into a tile group, repeated lengths across rows (so groups
# are gathered out of order), a document longer than the tile, one-token documents.
ROWS = {
    "mixed": [[13, 1, 30, 7, 21, 100, 3, 3, 82], [178, 82]],
    "many_short": [[40] * 6 + [20], [20] + [40] * 6],
    "long_docs": [[SEGMENT_TILE + 30, 30], [30, SEGMENT_TILE + 30]],
    "equal": [[64] * 4, [64] * 4],
    "single_doc": [[200], [200]],
}


def model_pair(config):
    model = PersimmonForCausalLM.from_config(config)
    randomize(model, seed=3)
    return model.train()


def loss_and_grads(model, ids, pos, backend):
    model.config.attention = backend
    model.zero_grad(set_to_none=True)
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, position_ids=pos, labels=labels, return_logits=True)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("rows", sorted(ROWS))
def test_segments_equals_sdpa_forward_and_gradients(rows):
    ids, pos = packed_rows(ROWS[rows])
    model = model_pair(parity_config(max_position_embeddings=512))
    ref_logits, ref_grads = loss_and_grads(model, ids, pos, "sdpa")
    logits, grads = loss_and_grads(model, ids, pos, "segments")
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-6, rtol=1e-4), name


def test_segments_layout_groups_short_documents_and_reorders():
    _, pos = packed_rows(ROWS["mixed"])
    layout = build_layout(pos.shape[1], pos.shape[1], None, pos, CPU, backend="segments")
    assert layout.backend == "segments"
    # Every token lands in exactly one group, and the groups' tokens add up to the batch.
    assert sum(length * n for length, n, _ in layout.buckets) == pos.numel()
    # Both rows have a 178- and an 82-token group: a bucket mixes rows, so tokens move.
    assert layout.order is not None and torch.equal(layout.order[layout.inverse], torch.arange(pos.numel()))
    # A multi-document group carries its block-diagonal causal mask.
    masked = [mask for _, _, mask in layout.buckets if mask is not None]
    assert masked and all(m.shape[-1] <= SEGMENT_TILE for m in masked)


def test_flex_forward_equals_sdpa():
    pytest.importorskip("torch.nn.attention.flex_attention")
    ids, pos = packed_rows(ROWS["mixed"])
    model = model_pair(parity_config(max_position_embeddings=512)).eval()
    with torch.no_grad():
        model.config.attention = "sdpa"
        ref = model(ids, position_ids=pos).logits
        model.config.attention = "flex"
        got = model(ids, position_ids=pos).logits
    assert (got - ref).abs().max().item() <= 1e-5


def test_varlen_is_gpu_only():
    pytest.skip(
        "varlen_attn has no CPU kernel (aten::_flash_attention_forward); bench/gpu.sh checks it "
        "against sdpa, forward and gradients, on a GPU"
    )


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal_ok):
    """What varlen_attn computes, in plain SDPA per [start, end) of cu_seqlens ([tokens, heads, dim])."""
    assert causal_ok and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    outs = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("spelling", ["window_size", "is_causal"])
def test_varlen_plumbing_with_a_reference_kernel(monkeypatch, spelling):
    """cu_seqlens, the [tokens, heads, dim] reshapes and the causal argument of either torch spelling,
    checked on CPU by standing a plain-SDPA kernel in for the CUDA one."""
    import persimmon_train.model.attention as attention

    if spelling == "window_size":

        def fake(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
            return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size == (-1, 0))
    else:

        def fake(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, scale=None):
            return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal)

    monkeypatch.setattr(attention, "_torch_varlen", lambda: fake)
    attention._varlen_signature.cache_clear()
    try:
        ids, pos = packed_rows(ROWS["mixed"])
        model = model_pair(parity_config(max_position_embeddings=512))
        ref_logits, ref_grads = loss_and_grads(model, ids, pos, "sdpa")
        logits, grads = loss_and_grads(model, ids, pos, "varlen")
    finally:
        attention._varlen_signature.cache_clear()
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-6, rtol=1e-4), name


def test_auto_picks_per_device_and_packing():
    assert resolve_backend("auto", CPU, torch.float32, packed=True) == "segments"
    assert resolve_backend("auto", CPU, torch.float32, packed=False) == "sdpa"
    assert resolve_backend("flex", CPU, torch.float32, packed=False) == "flex"
    # CUDA choice without a GPU: fp32 cannot use the flash varlen kernel.
    assert resolve_backend("auto", torch.device("cuda"), torch.float32, packed=True) in ("flex", "sdpa")
    # auto on CPU trains packed rows through segments: same numbers as sdpa.
    ids, pos = packed_rows(ROWS["equal"])
    model = model_pair(parity_config(max_position_embeddings=512))
    ref, _ = loss_and_grads(model, ids, pos, "sdpa")
    got, _ = loss_and_grads(model, ids, pos, "auto")
    assert (got - ref).abs().max().item() <= 1e-5


def test_padding_and_cache_fall_back_to_sdpa():
    mask = torch.tensor([[0, 1, 1, 1]])
    layout = build_layout(4, 4, mask, torch.arange(4)[None], CPU, backend="segments")
    assert layout.backend == "sdpa" and layout.mask is not None
    layout = build_layout(1, 5, None, torch.tensor([[4]]), CPU, backend="flex")
    assert layout.backend == "sdpa"


def test_bad_backend_names_the_key():
    with pytest.raises(ConfigError, match="attention"):
        PersimmonConfig(attention="flash9")
    with pytest.raises(ConfigError, match="model.attention"):
        resolve_backend("flash9", CPU, torch.float32, packed=True)


def test_attention_choice_is_not_saved(tmp_path):
    config = parity_config(attention="segments")
    assert "attention" not in config.to_dict()


def test_flex_refuses_attention_dropout():
    ids, pos = packed_rows(ROWS["equal"])
    model = model_pair(parity_config(max_position_embeddings=512, attention_dropout=0.1))
    model.config.attention = "flex"
    with pytest.raises(ConfigError, match="attention_dropout"):
        model(ids, position_ids=pos, labels=ids)
