"""Peak host memory of causal-LM loss + backward: our chunked loss vs transformers' full logits.

One config with the real 262144-token vocabulary, one 4096-token sequence and a small hidden size
(so the LM head and its logits dominate). Each variant runs in its own fresh subprocess, and the
parent prints them side by side: peak RSS growth during forward+backward (ru_maxrss minus the RSS
just before), and wall time, with ratios. Run:

    python bench/bench_loss_memory.py [--seq 4096] [--hidden 256] [--layers 2] [--vocab 262144]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from host_memory import int_options, status_kib


def run_variant(name: str, seq: int, hidden: int, vocab: int, layers: int = 1) -> dict:
    import torch

    torch.manual_seed(0)
    cfg = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        max_position_embeddings=seq,
    )
    if name == "ours":
        from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM

        model = PersimmonForCausalLM.from_config(PersimmonConfig(**cfg))
    else:
        import transformers

        model = transformers.PersimmonForCausalLM(transformers.PersimmonConfig(**cfg))
    ids = torch.randint(0, vocab, (1, seq))
    before = status_kib("VmRSS") * 1024
    for _ in range(2):  # the second step is timed (the first pays one-off allocations); peak covers both
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"variant": name, "peak_growth_bytes": peak - before, "seconds": elapsed, "loss": loss.item()}


def main() -> None:
    sizes = dict(seq=4096, hidden=256, layers=2, vocab=262144)
    parser = int_options(argparse.ArgumentParser(description=__doc__.splitlines()[0]), **sizes)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.seq, args.hidden, args.vocab, args.layers)))
        return
    results = {}
    for variant in ("ours", "transformers"):
        options = [f"--{name}={getattr(args, name)}" for name in sizes]
        cmd = [sys.executable, __file__, "--variant", variant, *options]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    ours, theirs = results["ours"], results["transformers"]
    gib = 2**30
    print(
        f"causal-LM loss + backward, vocab {args.vocab}, seq {args.seq}, hidden {args.hidden}, "
        f"{args.layers} layers, float32, CPU"
    )
    print(f"{'':>14} {'peak growth GiB':>16} {'seconds':>9} {'loss':>10}")
    for r in (ours, theirs):
        print(f"{r['variant']:>14} {r['peak_growth_bytes'] / gib:16.2f} {r['seconds']:9.2f} {r['loss']:10.4f}")
    print(f"memory ratio ours/transformers: {ours['peak_growth_bytes'] / theirs['peak_growth_bytes']:.3f}")
    print(f"time ratio ours/transformers:   {ours['seconds'] / theirs['seconds']:.3f}")


if __name__ == "__main__":
    main()
