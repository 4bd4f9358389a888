"""Tokenize+pack throughput and packing efficiency at seq_len 16384 on a long-tailed length mix.

    python bench/bench_packing.py [--docs 4000] [--num-proc 2] [--seq-len 16384]

Writes a synthetic JSONL corpus whose document lengths follow a long-tailed (log-normal, capped)
distribution, runs the real pipeline (build_data: datasets.map tokenization with num_proc workers,
best-fit-decreasing packing) into a fresh cache, and prints, side by side:
  - best-fit packing: real tokens / all tokens in rows of exactly seq_len;
  - greedy next-fit packing (concatenate in order, start a new row when a document does not fit);
  - padding each batch (of --batch documents, in data order) to its longest row.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from persimmon_train.data import DataConfig, Tokenizer, build_data, demo_assets


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    words = [w for line in open(demo_assets().train_files[0]) for w in json.loads(line)["response"].split()]
    # words per document: log-normal, median ~ 150 words, long tail up to ~12K words
    n_words = np.minimum(nrng.lognormal(5.0, 1.2, n_docs).astype(int) + 5, 12000)
    with open(path, "w") as f:
        for n in n_words:
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) + "\n")


def next_fit_rows(lengths: np.ndarray, seq_len: int) -> int:
    rows, used = 0, seq_len
    for n in lengths:
        while n > 0:
            take = min(n, seq_len)
            if used + take > seq_len:
                rows, used = rows + 1, 0
            used += take
            n -= take
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=8, help="documents per padded batch (baseline)")
    args = ap.parse_args()
    tok = Tokenizer(demo_assets().tokenizer_path)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        write_corpus(corpus, args.docs)
        cfg = DataConfig(
            train_files=[str(corpus)],
            format="text",
            seq_len=args.seq_len,
            num_proc=args.num_proc,
            cache_dir=str(Path(tmp) / "cache"),
        )
        t0 = time.perf_counter()
        bundle = build_data(cfg, tok, micro_batch_size=1, seed=0)
        seconds = time.perf_counter() - t0
        s = bundle.stats["train"]
        # document lengths back from the packed rows (position_ids restart at each document)
        pos = np.asarray(bundle.train_loader.arrays["position_ids"])
        labels = np.asarray(bundle.train_loader.arrays["labels"])
        lengths = []
        for p, lab in zip(pos, labels):
            starts = np.nonzero(p == 0)[0].tolist() + [len(p)]
            for a, b in zip(starts[:-1], starts[1:]):
                if (lab[a:b] != -100).any():
                    lengths.append(b - a)
        lengths = np.asarray(lengths)
        np.random.default_rng(0).shuffle(lengths)  # data order for the baselines
        nf = next_fit_rows(lengths, args.seq_len)
        padded_total = sum(
            int(lengths[i : i + args.batch].max()) * len(lengths[i : i + args.batch])
            for i in range(0, len(lengths), args.batch)
        )
    real = s["real_tokens"]
    print(
        f"corpus: {s['documents']} documents, {real} tokens, {s['split_documents']} longer than "
        f"seq_len (split), num_proc={args.num_proc}"
    )
    print(f"tokenize+pack: {seconds:.2f} s, {real / seconds:,.0f} tokens/s")
    print(f"{'method':<40}{'rows x len / tokens':>22}{'efficiency':>12}")
    print(f"{'best-fit-decreasing packing':<40}{s['rows']:>12} x {args.seq_len:<7}{100 * s['efficiency']:>11.2f}%")
    print(f"{'greedy next-fit packing':<40}{nf:>12} x {args.seq_len:<7}{100 * real / (nf * args.seq_len):>11.2f}%")
    padded_label = f"pad each batch of {args.batch} to its longest"
    print(f"{padded_label:<40}{padded_total:>22}{100 * real / padded_total:>11.2f}%")


if __name__ == "__main__":
    main()
