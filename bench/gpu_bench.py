"""The GPU benchmark behind bench/gpu.sh: equality, throughput, longest LoRA context; one table.

Parts (each guarded: a failing part prints its error and the others still run):
1. Backend equality at 4K packed rows in bf16: every attention backend vs sdpa on the same
   weights and batch, logits and gradients (max abs diff, relative to the sdpa values' scale).
2. Throughput at 16K packed rows (log-normal document mix), Persimmon-width layers (hidden 4096,
   64 heads, MLP 16384, vocab 262144) x --layers: ours with each backend vs transformers+peft
   (SDPA), full fine-tune and LoRA; tokens/s, MFU, peak memory (bench/train_throughput.py).
3. Longest LoRA context for the full 36-layer model: one row of 16K, 32K, 64K, 128K tokens
   (linear RoPE scaling past 16K), frozen bf16 base, activation checkpointing on every layer;
   the first that runs out of memory stops the sweep.

    python bench/gpu_bench.py --out results.txt            # on a GPU (bench/gpu.sh)
    python bench/gpu_bench.py --cpu-smoke --out /tmp/t.txt # tiny shapes on CPU: checks the script runs

Imports only torch, transformers, peft and persimmon_train.model / parallel (no deepspeed,
datasets, hydra, wandb, omegaconf).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_throughput as tt  # noqa: E402

from persimmon_train.model import PersimmonForCausalLM  # noqa: E402
from persimmon_train.parallel.activation_checkpointing import apply_activation_checkpointing  # noqa: E402


def backends_here(device: torch.device) -> list[str]:
    from persimmon_train.model.attention import _flex, varlen_available

    names = ["segments"]
    if _flex() is not None:
        names.append("flex")
    if varlen_available(device):
        names.append("varlen")
    return names


# ---------------------------------------------------------------------------- 1. equality


def equality(shape: tt.Shape, device, dtype, backends, flex_backward: bool) -> list[str]:
    ids, pos, _ = tt.document_mix(shape, seed=1)
    ids, pos = ids.to(device), pos.to(device)
    torch.manual_seed(0)
    model = PersimmonForCausalLM.from_config(shape.config(attention="sdpa"), device=device, dtype=dtype).train()

    def run(backend, backward=True):
        model.config.attention = backend
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):  # flex has no CPU backward: forward-only without grad
            out = model(ids, position_ids=pos, labels=ids, return_logits=True)
        if backward:
            out.loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters()} if backward else {}
        return out.logits.detach().float(), out.loss.item(), grads

    ref_logits, ref_loss, ref_grads = run("sdpa")
    lines = [
        f"backend equality vs sdpa: {shape.rows} x {shape.seq} packed, {dtype}, hidden {shape.hidden}, "
        f"{shape.layers} layers (max |diff| / max |sdpa|)",
        f"{'backend':<10}{'logits':>12}{'loss diff':>12}{'worst grad':>12}  {'parameter'}",
    ]
    for backend in backends:
        backward = backend != "flex" or flex_backward
        try:
            logits, loss, grads = run(backend, backward)
            rel = (logits - ref_logits).abs().max().item() / ref_logits.abs().max().item()
            worst, worst_name = 0.0, "-"
            for name, g in grads.items():
                r = (g - ref_grads[name]).abs().max().item() / max(ref_grads[name].abs().max().item(), 1e-12)
                if r > worst:
                    worst, worst_name = r, name
            grad_s = f"{worst:.2e}" if backward else "fwd only"
            lines.append(f"{backend:<10}{rel:>12.2e}{abs(loss - ref_loss):>12.2e}{grad_s:>12}  {worst_name}")
        except Exception as e:  # noqa: BLE001 -- report, keep going
            lines.append(f"{backend:<10} FAILED: {type(e).__name__}: {str(e)[:150]}")
    return lines


# ---------------------------------------------------------------------------- 3. context


def longest_lora_context(shape: tt.Shape, device, lengths: list[int], backend: str) -> list[str]:
    lines = [
        f"longest LoRA context, {shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}, bf16 base, "
        f"checkpointing every layer, attention={backend}, one document per row",
        f"{'tokens':>8}{'result':>12}{'step s':>9}{'peak GiB':>10}",
    ]
    for n in lengths:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base = shape.seq if shape.seq else 16384
        rope = {"type": "linear", "factor": float(n / base)} if n > base else None
        model = opt = None
        try:
            torch.manual_seed(0)
            config = shape.config(attention=backend, max_positions=base, rope_scaling=rope)
            model = PersimmonForCausalLM.from_config(config, device=device, dtype=torch.bfloat16)
            model = tt._lora(model)
            apply_activation_checkpointing(model, 1)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            ids = torch.randint(3, shape.vocab, (1, n), device=device)
            pos = torch.arange(n, device=device)[None]
            seconds = tt.train_step(model, opt, ids, pos, device, bf16=device.type == "cuda")
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            lines.append(f"{n:>8}{'fits':>12}{seconds:>9.2f}{peak:>10.1f}")
        except torch.OutOfMemoryError:
            lines.append(f"{n:>8}{'OOM':>12}{'-':>9}{'-':>10}")
            break
        finally:
            model = opt = None
    return lines


# ---------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="file the table is written to")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (checks the script runs)")
    ap.add_argument("--layers", type=int, default=4, help="throughput: Persimmon-width layers")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--parts", default="equality,throughput,context")
    ap.add_argument("--contexts", default="2048,4096,16384,32768,65536,131072")
    ap.add_argument("--compile", action="store_true", help="also torch.compile our layers in the throughput part")
    args = ap.parse_args()

    if args.cpu_smoke:
        device = torch.device("cpu")
        eq_shape = tt.Shape(hidden=64, layers=2, heads=4, intermediate=256, vocab=512, seq=512, rows=2, mean_doc=60)
        tp_shape = tt.Shape(hidden=64, layers=1, heads=4, intermediate=256, vocab=512, seq=256, rows=1, mean_doc=60)
        ctx_shape = tt.Shape(hidden=64, layers=2, heads=4, intermediate=256, vocab=512, seq=128)
        contexts = [128, 256]
        dtype, flex_backward = torch.float32, False
        backends = ["segments", "flex"]
        tp_backends = ["sdpa", "segments"]
        peak = None
    else:
        device = torch.device("cuda")
        eq_shape = tt.Shape(hidden=4096, layers=2, heads=64, intermediate=16384, vocab=262144, seq=4096, rows=1)
        tp_shape = tt.Shape(
            hidden=4096, layers=args.layers, heads=64, intermediate=16384, vocab=262144, seq=16384, rows=1
        )
        ctx_shape = tt.Shape(hidden=4096, layers=36, heads=64, intermediate=16384, vocab=262144, seq=16384)
        contexts = [int(x) for x in args.contexts.split(",")]
        dtype, flex_backward = torch.bfloat16, True
        backends = backends_here(device)
        tp_backends = ["sdpa"] + [b for b in backends if b != "segments"]
        peak = tt.peak_tflops(device, None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke shapes)"
    header = [
        f"persimmon-train GPU benchmark on {name}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    ]
    sections = []

    def part(title, fn):
        start = time.perf_counter()
        try:
            lines = fn()
        except Exception:  # noqa: BLE001 -- one broken part must not hide the others
            lines = [f"{title}: FAILED", traceback.format_exc(limit=3)]
        lines.append(f"({title}: {time.perf_counter() - start:.0f} s)")
        sections.append("\n".join(lines))
        print(sections[-1], flush=True)
        with open(args.out, "w", encoding="utf-8") as f:  # after every part: a timeout keeps what ran
            f.write("\n\n".join(header + sections) + "\n")

    parts = args.parts.split(",")
    if "equality" in parts:
        part("equality", lambda: equality(eq_shape, device, dtype, backends, flex_backward))
    if "throughput" in parts:

        def throughput():
            variants = tt.parse_variants("ours,transformers", "full,lora", ",".join(tp_backends))
            if device.type == "cuda":
                rows = tt.run_gpu(variants, tp_shape, device, args.steps, True, args.compile, peak)
            else:
                rows = tt.run_cpu(variants, tp_shape, 1, 1, measure_memory=False)
            title = (
                f"throughput: {tp_shape.rows} x {tp_shape.seq} packed tokens (log-normal documents), hidden "
                f"{tp_shape.hidden}, {tp_shape.layers} layers, vocab {tp_shape.vocab}, checkpointing every layer"
            )
            return tt.print_table(rows, title, echo=False).splitlines()

        part("throughput", throughput)
    if "context" in parts:
        backend = "auto"
        part("context", lambda: longest_lora_context(ctx_shape, device, contexts, backend))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
