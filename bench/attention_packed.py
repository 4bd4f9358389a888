"""Packed-row training cost per token on CPU: 16K rows vs 1K rows of the same documents.

The same 512-token documents are trained (forward + backward of the causal-LM loss, float32) as
  - 1K rows (two documents per row, a batch of 16 rows), and
  - one 16K row (32 documents),
with each attention backend. All variants run in one process, interleaved round by round, on the
same weights; the median time per round is reported as tokens/s with ratios against the 1K rows
through today's SDPA dense-mask path. Run:

    python bench/attention_packed.py [--hidden 256] [--layers 2] [--doc 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from host_memory import int_options

from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM


def packed_batch(n_docs: int, doc_len: int, docs_per_row: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n_docs * doc_len,), generator=g)
    pos = torch.arange(doc_len).repeat(n_docs)
    row = docs_per_row * doc_len
    return ids.view(-1, row), pos.view(-1, row)


def step_seconds(model, ids, pos) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(ids, position_ids=pos, labels=ids).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    int_options(ap, hidden=256, layers=2, heads=4, vocab=4096)
    ap.add_argument("--doc", type=int, default=512, help="document length (tokens)")
    ap.add_argument("--long", type=int, default=16384, help="long row length")
    ap.add_argument("--short", type=int, default=1024, help="short row length")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", default="sdpa,segments")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = PersimmonConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=args.long,
    )
    model = PersimmonForCausalLM.from_config(config)
    n_docs = args.long // args.doc
    shapes = {
        "1K rows": packed_batch(n_docs, args.doc, args.short // args.doc, args.vocab),
        "16K row": packed_batch(n_docs, args.doc, args.long // args.doc, args.vocab),
    }
    tokens = n_docs * args.doc
    variants = [(shape, backend) for backend in args.backends.split(",") for shape in shapes]
    times: dict = {v: [] for v in variants}
    for v in variants:  # warm-up
        model.config.attention = v[1]
        step_seconds(model, *shapes[v[0]])
    for _ in range(args.rounds):
        for v in variants:
            model.config.attention = v[1]
            times[v].append(step_seconds(model, *shapes[v[0]]))
    base = tokens / statistics.median(times[("1K rows", "sdpa")])
    print(
        f"packed training step (fwd+bwd), {args.doc}-token documents, hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads} heads, vocab {args.vocab}, float32, CPU threads {torch.get_num_threads()}, "
        f"{args.rounds} rounds, median"
    )
    print(f"{'rows':<10}{'attention':<12}{'tokens/s':>10}{'vs 1K sdpa':>12}")
    for v in variants:
        tps = tokens / statistics.median(times[v])
        print(f"{v[0]:<10}{v[1]:<12}{tps:>10.0f}{tps / base:>12.2f}")
    if ("16K row", "segments") in times:
        seg16 = tokens / statistics.median(times[("16K row", "segments")])
        seg1 = tokens / statistics.median(times[("1K rows", "segments")])
        print(f"16K segments / 1K sdpa: {seg16 / base:.2f}   16K segments / 1K segments: {seg16 / seg1:.2f}")


if __name__ == "__main__":
    main()
