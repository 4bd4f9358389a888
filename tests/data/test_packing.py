from collections import Counter

import numpy as np
import pytest
import torch

from persimmon_train.data import best_fit_decreasing, pack

IGNORE = -100


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(5, 500, size=n).astype(np.int32) for n in lengths]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.concatenate(docs)
    labels = flat.copy()
    labels[offsets[:-1]] = IGNORE  # formats.py convention: a document's first label is -100
    return docs, flat, labels, offsets


def _split_rows_into_docs(rows):
    """Documents of each packed row, found from position_ids alone."""
    out = []
    for ids, labels, pos in zip(rows["input_ids"], rows["labels"], rows["position_ids"]):
        starts = np.nonzero(pos == 0)[0].tolist() + [len(pos)]
        for a, b in zip(starts[:-1], starts[1:]):
            out.append((ids[a:b], labels[a:b], pos[a:b]))
    return out


def test_rows_are_full_and_documents_whole():
    lengths = [30, 100, 64, 7, 1, 99, 50, 50, 20]
    docs, flat, labels, offsets = _docs(lengths)
    rows, stats = pack(flat, labels, offsets, seq_len=128, pad_id=0)
    assert rows["input_ids"].shape[1] == 128
    assert stats.real_tokens == sum(lengths)
    pieces = _split_rows_into_docs(rows)
    real = [p for p in pieces if not (p[1] == IGNORE).all() or len(p[0]) == 1]
    # every document appears once, whole, with positions 0..n-1
    got = sorted(tuple(p[0].tolist()) for p in pieces if tuple(p[0].tolist()) in {tuple(d.tolist()) for d in docs})
    assert got == sorted(tuple(d.tolist()) for d in docs)
    for _ids, lab, pos in pieces:
        assert (pos == np.arange(len(pos))).all()
        assert lab[0] == IGNORE
    assert real  # sanity


def test_labels_ignored_at_doc_starts_and_padding():
    docs, flat, labels, offsets = _docs([10, 20, 5])
    labels = flat.copy()  # even if a caller forgot, the packer masks each document's first token
    rows, stats = pack(flat, labels, offsets, seq_len=64, pad_id=3)
    ids, lab, pos = rows["input_ids"][0], rows["labels"][0], rows["position_ids"][0]
    starts = np.nonzero(pos == 0)[0]
    assert (lab[starts] == IGNORE).all()
    pad = slice(35, 64)
    assert (ids[pad] == 3).all() and (lab[pad] == IGNORE).all()
    assert (pos[pad] == np.arange(29)).all() and stats.padding_tokens == 29
    others = np.setdiff1d(np.arange(35), starts)
    assert (lab[others] == ids[others]).all()


@pytest.mark.parametrize("long_docs", ["split", "drop"])
def test_nothing_lost_or_duplicated(long_docs):
    rng = np.random.default_rng(1)
    lengths = np.minimum((rng.pareto(1.0, 400) * 40 + 1).astype(int), 2000).tolist() + [700, 257, 256]
    docs, flat, labels, offsets = _docs(lengths, seed=2)
    rows, stats = pack(flat, labels, offsets, seq_len=256, pad_id=0, long_docs=long_docs)
    kept = [d for d, n in zip(docs, lengths) if long_docs == "split" or n <= 256]
    ids = rows["input_ids"]
    # document tokens are 5..499 and pad_id is 0, so padding is exactly the zeros
    assert Counter(ids[ids != 0].tolist()) == Counter(np.concatenate(kept).tolist())
    assert (ids == 0).sum() == stats.padding_tokens and (ids != 0).sum() == stats.real_tokens
    if long_docs == "split":
        assert stats.split_documents == sum(n > 256 for n in lengths)
        assert stats.dropped_documents == 0
    else:
        assert stats.dropped_documents == sum(n > 256 for n in lengths)
        assert stats.dropped_tokens == sum(n for n in lengths if n > 256)
    assert ids.shape[1] == 256


def _greedy_rows(lengths, capacity: int) -> int:
    """The naive packer, as the baseline: documents in corpus order, a new row whenever the next
    one does not fit in the current row."""
    rows, free = 0, 0
    for n in lengths.tolist():
        if n > free:
            rows, free = rows + 1, capacity
        free -= n
    return rows


def test_best_fit_beats_greedy_and_reaches_995_at_16k():
    rng = np.random.default_rng(0)
    lengths = np.minimum((rng.lognormal(6.0, 1.3, 6000)).astype(int) + 1, 16384)
    bins = best_fit_decreasing(lengths, 16384)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(lengths[b].sum() <= 16384 for b in bins)
    efficiency = lengths.sum() / (len(bins) * 16384)
    greedy = _greedy_rows(lengths, 16384)
    greedy_efficiency = lengths.sum() / (greedy * 16384)
    print(f"16K rows: best-fit-decreasing {len(bins)} ({efficiency:.4f}), greedy {greedy} ({greedy_efficiency:.4f})")
    assert efficiency >= 0.995, efficiency
    assert greedy_efficiency < 0.95 and len(bins) < 0.95 * greedy, (len(bins), greedy)
    # Never more than one row above the bound no packer can beat.
    assert len(bins) <= -(-lengths.sum() // 16384) + 1


@pytest.mark.parametrize(
    "lengths, rows",
    [
        # Decreasing matters: in corpus order the 2s share a row and each 8 then needs its own.
        ([2, 2, 2, 8, 8, 8], [[8, 2], [8, 2], [8, 2]]),
        # Best fit matters: 4 goes where it fills a row (free 4), not into the emptiest row (free 5),
        # which would leave 3 and 2 without room for both.
        ([6, 5, 4, 3, 2], [[6, 4], [5, 3, 2]]),
    ],
)
def test_best_fit_decreasing_by_hand(lengths, rows):
    lengths = np.array(lengths)
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(sorted(lengths[b].tolist(), reverse=True) for b in bins) == sorted(rows)


def test_pack_uses_best_fit_rows():
    """`pack` itself (not only the bin function) fills rows as best-fit-decreasing does."""
    lengths = [6, 6, 4, 4, 5, 5]  # greedy in order: [6] [6 4] [4 5] [5]; best fit: [6 4] [6 4] [5 5]
    _, flat, labels, offsets = _docs(lengths)
    rows, stats = pack(flat, labels, offsets, seq_len=10, pad_id=0)
    assert _greedy_rows(np.array(lengths), 10) == 4
    assert stats.rows == rows["input_ids"].shape[0] == len(best_fit_decreasing(np.array(lengths), 10)) == 3
    assert stats.padding_tokens == 0


def test_packed_logits_equal_each_document_alone(tok):
    model_mod = pytest.importorskip("persimmon_train.model")
    torch.manual_seed(0)
    config = model_mod.PersimmonConfig(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    model = model_mod.PersimmonForCausalLM(config).eval().float()
    texts = [
        "What is 2 plus 2?",
        "The capital of France is Paris.",
        "Reverse the word apple: elppa.",
        "There are 300 centimeters in 3 meters.",
        "a",
    ]
    doc_ids = [tok.encode(t, eos=True) for t in texts]
    lengths = [len(d) for d in doc_ids]
    flat = np.concatenate([np.asarray(d, np.int32) for d in doc_ids])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    seq_len = sum(lengths) // 2 + 8
    rows, _ = pack(flat, flat.copy(), offsets, seq_len=seq_len, pad_id=tok.pad_id)
    assert rows["input_ids"].shape[0] >= 2  # several documents share each row
    with torch.no_grad():
        ids = torch.from_numpy(rows["input_ids"]).long()
        pos = torch.from_numpy(rows["position_ids"]).long()
        packed = model(input_ids=ids, position_ids=pos).logits
        checked = 0
        for d in doc_ids:
            alone = model(input_ids=torch.tensor([d])).logits[0]
            # find where the document sits in the packed rows
            for r in range(ids.shape[0]):
                starts = (pos[r] == 0).nonzero().flatten().tolist()
                for s in starts:
                    if ids[r, s : s + len(d)].tolist() == d and (s + len(d) == seq_len or pos[r, s + len(d)] == 0):
                        torch.testing.assert_close(packed[r, s : s + len(d)], alone, atol=1e-5, rtol=1e-5)
                        checked += 1
                        break
                else:
                    continue
                break
        assert checked == len(doc_ids)
