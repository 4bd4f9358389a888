"""DPO / Bradley-Terry on packed pairs equal a hand computation on transformers' Persimmon."""

import math

import numpy as np
import pytest
import torch

from persimmon_train.data.preference import pack_pairs
from persimmon_train.model.preference import (
    bradley_terry_loss,
    document_last,
    document_sums,
    dpo_loss,
    num_docs,
    pair_mask,
    pairs,
)
from tests.helpers import parity_config, twins

BETA, SMOOTH = 0.5, 0.1


def _pairs(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [
        [list(map(int, rng.integers(3, 160, rng.integers(lo, hi)))) for lo, hi in ((2, 9), (1, 8), (1, 8))]
        for _ in range(n)
    ]


def _hf_logps(hf, prompt, response):
    """Hand computation, one unpacked sequence: sum and mean of log p(response tokens)."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(hf(input_ids=ids).logits[0].double(), -1)
    vals = [logp[t - 1, ids[0, t]] for t in range(len(prompt), ids.shape[1])]
    return torch.stack(vals).sum(), torch.stack(vals).mean()


def _ours(model, items, seq_len):
    arrays, _ = pack_pairs(items, seq_len, 0)
    batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in arrays.items()}
    out = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], return_token_logps=True)
    docs = num_docs(batch["doc_ids"])
    sums, counts = document_sums(out.token_logps, batch["labels"], batch["doc_ids"], docs)
    mask = pair_mask(batch["doc_ids"], docs)
    # pack_pairs orders rows and slots by length: match pairs back by their response lengths + sums
    (c, r), (nc, nr) = pairs(sums), pairs(counts)
    return c[mask], r[mask], nc[mask], nr[mask], arrays["input_ids"].shape[0]


def _by_pair(items, c, r, nc, nr, hf_lengths):
    """Our packed per-pair numbers in the order of `items` (rows reorder pairs)."""
    found = {}
    for k in range(len(c)):
        found.setdefault((int(nc[k]), int(nr[k])), []).append(k)
    order = [found[key].pop(0) for key in hf_lengths]
    return c[order], r[order], nc[order], nr[order]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_on_packed_rows_equals_transformers_by_hand(loss_type):
    torch.manual_seed(0)
    config = parity_config()
    policy, hf_policy = twins(config, seed=0)
    ref, hf_ref = twins(config, seed=1)
    policy.loss_chunk_size = 4  # several checkpointed chunks of the head
    items = [p for p in _pairs(5) if len(p[1]) != len(p[2])]  # distinct lengths: pairs matched by counts
    lengths = [(len(c), len(r)) for _, c, r in items]

    def hand(hf, avg):
        pc, pr = [], []
        for prompt, c, r in items:
            (sc, mc), (sr, mr) = _hf_logps(hf, prompt, c), _hf_logps(hf, prompt, r)
            pc.append(mc if avg else sc)
            pr.append(mr if avg else sr)
        return torch.stack(pc), torch.stack(pr)

    avg = loss_type == "ipo"
    hpc, hpr = hand(hf_policy, avg)
    hrc, hrr = hand(hf_ref, avg)
    logits = (hpc - hpr) - (hrc - hrr)
    if avg:
        hand_losses = [(x - 1 / (2 * BETA)) ** 2 for x in logits.tolist()]
    else:
        sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
        hand_losses = [
            -(1 - SMOOTH) * math.log(sig(BETA * x)) - SMOOTH * math.log(sig(-BETA * x)) for x in logits.tolist()
        ]

    seq_len = 3 * max(2 * len(p) + len(c) + len(r) for p, c, r in items)
    c, r, nc, nr, rows = _ours(policy, items, seq_len)
    assert rows < len(items)  # several pairs per row
    c, r, nc, nr = _by_pair(items, c, r, nc, nr, lengths)
    with torch.no_grad():
        rc, rr, rnc, rnr, _ = _ours(ref, items, seq_len)
        rc, rr, _, _ = _by_pair(items, rc, rr, rnc, rnr, lengths)
    if avg:
        c, r, rc, rr = c / nc, r / nr, rc / nc, rr / nr
    torch.testing.assert_close(c.double(), hpc.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(r.double(), hpr.detach(), rtol=0, atol=1e-5)
    losses, cr, rj = dpo_loss(c, r, rc, rr, BETA, loss_type, SMOOTH if not avg else 0.0)
    torch.testing.assert_close(losses.double(), torch.tensor(hand_losses, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(cr.double(), BETA * (hpc - hrc).detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(rj.double(), BETA * (hpr - hrr).detach(), rtol=0, atol=1e-5)

    # gradients through the packed row, the chunked head and the scatter equal transformers' own
    losses.mean().backward()
    hf_logits = (hpc - hpr) - (hrc - hrr).detach()
    if avg:
        hf_losses = (hf_logits - 1 / (2 * BETA)) ** 2
    else:
        hf_losses = -(1 - SMOOTH) * torch.nn.functional.logsigmoid(
            BETA * hf_logits
        ) - SMOOTH * torch.nn.functional.logsigmoid(-BETA * hf_logits)
    hf_losses.mean().backward()
    hf_grads = dict(hf_policy.named_parameters())
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[name].grad.float(), rtol=1e-4, atol=1e-6, msg=name)


def test_packed_equals_unpacked_per_pair():
    policy, _ = twins(parity_config(), seed=0)
    items = [p for p in _pairs(6, seed=3) if len(p[1]) != len(p[2])]
    lengths = [(len(c), len(r)) for _, c, r in items]
    with torch.no_grad():
        big = 3 * max(2 * len(p) + len(c) + len(r) for p, c, r in items)
        packed = _by_pair(items, *_ours(policy, items, big)[:4], lengths)
        alone = [_ours(policy, [it], 2 * len(it[0]) + len(it[1]) + len(it[2]))[:2] for it in items]
    torch.testing.assert_close(packed[0], torch.cat([a[0] for a in alone]), rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[1], torch.cat([a[1] for a in alone]), rtol=0, atol=1e-5)


def test_document_last_and_bradley_terry():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2, 3, -1], [0, 1, 1, -1, -1, -1, -1, -1]])
    last = document_last(doc_ids, 4)
    assert last.tolist() == [[1, 4, 5, 6], [0, 2, -1, -1]]
    assert pair_mask(doc_ids, 4).tolist() == [[True, True], [True, False]]
    s = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5]), margin=1.0)
    assert float(s) == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))), abs=1e-7)
