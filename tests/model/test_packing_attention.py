"""Packed rows: every token's logits equal those of its document run alone."""

import torch

from persimmon_train.model.attention import build_layout, document_ids
from tests.helpers import parity_config, twins


def pack(docs, pad_to=None, pad_id=0):
    ids = torch.cat(docs)
    pos = torch.cat([torch.arange(len(d)) for d in docs])
    if pad_to is not None and pad_to > len(ids):
        n = pad_to - len(ids)
        ids = torch.cat([ids, torch.full((n,), pad_id)])
        pos = torch.cat([pos, torch.arange(n)])  # padding is its own "document"
    return ids[None], pos[None]


def test_packed_row_equals_documents_alone():
    model, _ = twins(parity_config(max_position_embeddings=128))
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 160, (n,), generator=g) for n in (13, 1, 30, 7, 21)]
    ids, pos = pack(docs, pad_to=80)
    with torch.no_grad():
        packed = model(ids, position_ids=pos).logits[0]
        start = 0
        for doc in docs:
            alone = model(doc[None]).logits[0]
            assert (packed[start : start + len(doc)] - alone).abs().max().item() <= 1e-5
            start += len(doc)
        # And without position_ids the same row is one long document: documents do mix then.
        mixed = model(ids).logits[0]
    assert (mixed[13:14] - packed[13:14]).abs().max().item() > 1e-3


def test_packed_batch_rows_are_independent():
    model, _ = twins(parity_config(max_position_embeddings=128))
    g = torch.Generator().manual_seed(1)
    rows = [[torch.randint(1, 160, (n,), generator=g) for n in lens] for lens in ((10, 20, 18), (48,))]
    packed = [pack(docs, pad_to=48) for docs in rows]
    ids = torch.cat([p[0] for p in packed])
    pos = torch.cat([p[1] for p in packed])
    with torch.no_grad():
        batch = model(ids, position_ids=pos).logits
        for i, (row_ids, row_pos) in enumerate(packed):
            assert (batch[i] - model(row_ids, position_ids=row_pos).logits[0]).abs().max().item() <= 1e-5


def test_packed_gradients_do_not_cross_documents():
    """The loss of document B must not depend on document A's tokens (checked via gradients)."""
    model, _ = twins(parity_config(max_position_embeddings=128))
    ids, pos = pack([torch.arange(1, 11), torch.arange(20, 35)])
    embeds = model.model.embed_tokens
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["e"] = output

    handle = embeds.register_forward_hook(keep)
    labels = ids.clone()
    labels[0, :11] = -100  # only document B's targets count (its first token is not a target)
    model(ids, position_ids=pos, labels=labels).loss.backward()
    handle.remove()
    grad = captured["e"].grad[0]
    assert grad[:10].abs().max().item() == 0.0  # document A gets no gradient from B's loss
    assert grad[10:].abs().max().item() > 0.0


def test_layout_mask_structure():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert document_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3]]
    mask = build_layout(6, 6, None, pos, torch.device("cpu")).mask[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    # No restart after the first token: the plain causal fast path, no mask tensor.
    layout = build_layout(4, 4, None, torch.arange(4)[None], torch.device("cpu"))
    assert layout.mask is None and layout.is_causal
