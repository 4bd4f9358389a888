"""Training throughput: ours vs transformers+peft, same weights, full fine-tune and LoRA.

Each variant is one (implementation, mode, attention backend). Every training step is forward +
backward + AdamW step on packed rows (position_ids restart at each document) drawn from a
long-tailed document-length mix. Printed per variant: tokens/s, MFU (when the device's peak is
known), peak memory, and the ratio against transformers+peft in the same mode.

MFU: the trainer's own FLOPs count and peak table (persimmon_train/training/metrics.py): 6N per
token for full fine-tuning, 4N for LoRA, N = the matmul parameters (decoder + LM head, not the
embedding), plus document-masked attention, 6 * hidden * layers * sum(doc_len**2); recomputation
by activation checkpointing is not counted. transformers' SDPA path attends across the documents
of a packed row (causal over the whole row); it is credited with the same useful FLOPs.

CPU (small shapes, interleaved round by round in one process; peak memory of one step of each
variant measured in its own subprocess):

    python bench/train_throughput.py --device cpu

GPU: bench/gpu.sh runs it (variants one after another, each freed before the next; peak memory
from torch.cuda). Needs only torch, transformers, peft (no deepspeed/datasets/hydra/wandb).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from host_memory import status_kib  # noqa: E402  (this folder is first on sys.path)

from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM  # noqa: E402
from persimmon_train.parallel.activation_checkpointing import apply_activation_checkpointing  # noqa: E402
from persimmon_train.training.metrics import device_peak_flops, training_flops  # noqa: E402

LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


@dataclass
class Shape:
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    intermediate: int = 1024
    vocab: int = 16384
    seq: int = 2048
    rows: int = 1
    mean_doc: int = 600  # median-ish document length of the mix (log-normal)

    def config(self, attention="auto", max_positions=None, rope_scaling=None) -> PersimmonConfig:
        return PersimmonConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            max_position_embeddings=max_positions or max(self.seq, 16384),
            rope_scaling=rope_scaling,
            attention=attention,
            bos_token_id=1,
            eos_token_id=2,
        )


def document_mix(shape: Shape, seed: int = 0):
    """Packed rows of a log-normal document-length mix (capped at the row): ids, position_ids, lengths."""
    g = torch.Generator().manual_seed(seed)
    pos_rows, lengths = [], []
    for _ in range(shape.rows):
        row, used = [], 0
        while used < shape.seq:
            n = int(
                torch.empty(1)
                .log_normal_(mean=float(torch.log(torch.tensor(shape.mean_doc))), std=1.0, generator=g)
                .clamp(8, shape.seq)
                .item()
            )
            n = min(n, shape.seq - used)
            row.append(torch.arange(n))
            lengths.append(n)
            used += n
        pos_rows.append(torch.cat(row))
    pos = torch.stack(pos_rows)
    ids = torch.randint(3, shape.vocab, pos.shape, generator=g)
    return ids, pos, lengths


def flops_per_step(shape: Shape, lengths: list[int], lora: bool) -> float:
    """The trainer's own count (training/metrics.py): the same MFU the runs log."""
    attention = sum(L * L for L in lengths)
    return training_flops(shape.config(), shape.rows * shape.seq, attention, full_finetune=not lora)


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    peak = device_peak_flops(device, override)
    return peak / 1e12 if peak else None


# ---------------------------------------------------------------------------- models


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1234)  # same LoRA A init for ours and transformers'
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))


def build(
    impl: str,
    mode: str,
    backend: str,
    shape: Shape,
    device,
    bf16_base: bool,
    seed: int = 0,
    checkpointing: bool = True,
    compile_layers: bool = False,
    **config_kw,
):
    """Our model or transformers' (same random weights from `seed`), LoRA-wrapped for mode=lora."""
    torch.manual_seed(seed)
    config = shape.config(attention=backend if impl == "ours" else "sdpa", **config_kw)
    ours = PersimmonForCausalLM.from_config(config, device=device)
    if impl == "ours":
        model = ours
    else:
        import transformers

        hf_config = transformers.PersimmonConfig.from_dict(config.to_dict())
        hf_config._attn_implementation = "sdpa"
        with torch.device(device):
            model = transformers.PersimmonForCausalLM(hf_config)
        model.load_state_dict(ours.state_dict())
        del ours
    if mode == "lora":
        if bf16_base:
            model.to(torch.bfloat16)  # frozen base in bf16 (adapters stay float32, peft's default)
        model = _lora(model)
    if checkpointing:
        if impl == "ours":
            apply_activation_checkpointing(model, 1)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile_layers and impl == "ours":
        from persimmon_train.parallel.compile import compile_decoder_layers

        compile_decoder_layers(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=device.type == "cuda")
    return model, optimizer


def train_step(model, optimizer, ids, pos, device, bf16: bool) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, position_ids=pos, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def variant_name(impl, mode, backend):
    return f"{'ours' if impl == 'ours' else 'transformers+peft'}/{mode}/{backend if impl == 'ours' else 'sdpa'}"


# ---------------------------------------------------------------------------- runners


def run_gpu(variants, shape: Shape, device, steps: int, bf16: bool, compile_layers: bool, peak) -> list[dict]:
    """One variant at a time (each freed before the next): big shapes do not fit twice."""
    ids, pos, lengths = document_mix(shape)
    ids, pos = ids.to(device), pos.to(device)
    results = []
    for impl, mode, backend in variants:
        name = variant_name(impl, mode, backend)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            model, opt = build(impl, mode, backend, shape, device, bf16_base=bf16, compile_layers=compile_layers)
            train_step(model, opt, ids, pos, device, bf16)  # warm-up (kernel choice, compile)
            times = [train_step(model, opt, ids, pos, device, bf16) for _ in range(steps)]
            row = dict(
                variant=name, seconds=statistics.median(times), peak_gib=torch.cuda.max_memory_allocated(device) / 2**30
            )
        except torch.OutOfMemoryError:
            row = dict(variant=name, seconds=None, peak_gib=None, error="OOM")
        except Exception as e:  # noqa: BLE001 -- one broken backend must not hide the others' numbers
            row = dict(variant=name, seconds=None, peak_gib=None, error=f"{type(e).__name__}: {e}"[:200])
        model = opt = None
        results.append(_finish(row, shape, lengths, mode, peak))
        print(json.dumps(results[-1]), flush=True)
    return results


def run_cpu(variants, shape: Shape, steps: int, rounds: int, measure_memory: bool) -> list[dict]:
    """All variants alive at once, timed round by round (interleaved); memory per variant in a subprocess."""
    device = torch.device("cpu")
    ids, pos, lengths = document_mix(shape)
    # Memory first, while this process is still small (the children are forked from it).
    peaks = {v: _cpu_peak_in_subprocess(v, shape) if measure_memory else None for v in variants}
    built = {v: build(*v, shape, device, bf16_base=False) for v in variants}
    for model, opt in built.values():
        train_step(model, opt, ids, pos, device, False)
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v, (model, opt) in built.items():
            times[v].extend(train_step(model, opt, ids, pos, device, False) for _ in range(steps))
    results = []
    for v in variants:
        row = dict(variant=variant_name(*v), seconds=statistics.median(times[v]), peak_gib=peaks[v])
        results.append(_finish(row, shape, lengths, v[1], None))
    return results


def _cpu_peak_in_subprocess(variant, shape: Shape) -> float:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-child",
        ",".join(variant),
        "--shape",
        json.dumps(shape.__dict__),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gib"]


def _memory_child(variant: str, shape_json: str) -> None:
    """One variant, one step, in a fresh process: peak RSS growth over the RSS after building it."""
    impl, mode, backend = variant.split(",")
    shape = Shape(**json.loads(shape_json))
    device = torch.device("cpu")
    ids, pos, _ = document_mix(shape)
    model, opt = build(impl, mode, backend, shape, device, bf16_base=False)
    before = status_kib("VmRSS") * 1024
    train_step(model, opt, ids, pos, device, False)
    # VmHWM, not ru_maxrss: getrusage's maximum survives execve, so a child would report its
    # parent's peak (the parent holds every variant's model).
    peak = status_kib("VmHWM") * 1024
    print(json.dumps({"peak_gib": (peak - before) / 2**30}))


def _finish(row, shape, lengths, mode, peak) -> dict:
    tokens = shape.rows * shape.seq
    row["tokens_per_s"] = tokens / row["seconds"] if row.get("seconds") else None
    flops = flops_per_step(shape, lengths, lora=mode == "lora")
    row["mfu"] = (flops / row["seconds"] / (peak * 1e12)) if (peak and row.get("seconds")) else None
    return row


def print_table(results: list[dict], title: str, echo: bool = True) -> str:
    lines = [title, f"{'variant':<34}{'tokens/s':>11}{'MFU':>8}{'peak GiB':>10}{'vs transformers':>17}"]
    baseline = {
        r["variant"].split("/")[1]: r.get("tokens_per_s") for r in results if r["variant"].startswith("transformers")
    }
    for r in results:
        mode = r["variant"].split("/")[1]
        tps, base, mfu, peak = r.get("tokens_per_s"), baseline.get(mode), r.get("mfu"), r.get("peak_gib")
        tps_s = f"{tps:,.0f}" if tps else str(r.get("error", "-"))[:10]
        mfu_s = f"{100 * mfu:.1f}%" if mfu else "-"
        peak_s = f"{peak:.2f}" if peak is not None else "-"
        ratio_s = f"{tps / base:.2f}x" if tps and base else "-"
        lines.append(f"{r['variant']:<34}{tps_s:>11}{mfu_s:>8}{peak_s:>10}{ratio_s:>17}")
    text = "\n".join(lines)
    if echo:
        print(text, flush=True)
    return text


def parse_variants(impls: str, modes: str, backends: str):
    out = []
    for mode in modes.split(","):
        for impl in impls.split(","):
            for backend in backends.split(",") if impl == "ours" else ["sdpa"]:
                out.append((impl, mode, backend))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=None, help="default 4 * hidden")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--impls", default="ours,transformers")
    ap.add_argument("--backends", default="auto")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="CPU: interleaved rounds")
    ap.add_argument("--no-memory", action="store_true", help="CPU: skip the per-variant memory subprocesses")
    ap.add_argument("--compile", action="store_true", help="torch.compile our decoder layers")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child, args.shape)
        return
    shape = Shape(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate=args.intermediate or 4 * args.hidden,
        vocab=args.vocab,
        seq=args.seq,
        rows=args.rows,
    )
    variants = parse_variants(args.impls, args.modes, args.backends)
    device = torch.device(args.device)
    if device.type == "cuda":
        peak = peak_tflops(device, args.peak_tflops)
        results = run_gpu(variants, shape, device, args.steps, True, args.compile, peak)
        precision = f"bf16 autocast, {torch.cuda.get_device_name(device)}"
    else:
        results = run_cpu(variants, shape, args.steps, args.rounds, not args.no_memory)
        precision = f"float32, CPU, {torch.get_num_threads()} threads"
    print_table(
        results,
        f"train step (fwd+bwd+AdamW), {shape.rows} x {shape.seq} packed tokens, "
        f"hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads, vocab {shape.vocab}, "
        f"{precision}, activation checkpointing on every layer (both)",
    )


if __name__ == "__main__":
    main()
