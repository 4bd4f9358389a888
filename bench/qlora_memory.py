"""Peak host memory of a short LoRA run over a bf16 base vs QLoRA (NF4 base), side by side.

    python bench/qlora_memory.py [--steps 2] [--seq-len 64]

Writes a ~176M-parameter Persimmon (hidden 1024, intermediate 4096, 14 layers, the demo
tokenizer's vocabulary) with random weights, saved in bf16, then runs `recipes/finetune.py
strategy=single peft=lora trainer.precision=bf16 model.path=...` twice, each in a fresh process
with the same data and sequence length: once as is (the frozen base held in bf16,
parallel/frozen_weights.py) and once with `peft.quantize_base=nf4`. Each run reports its peak RSS
(VmHWM at exit), its RSS right after the model is loaded, and its seconds; the line after the
table gives the ratios. A bench, not a test: about 2-4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from host_memory import REPO, reported, run_measured
from lora_memory import write_base

HIDDEN, LAYERS = 1024, 14  # intermediate 4 x hidden, 16 heads, max_position_embeddings 1024

DRIVER = r"""
import sys
from bench.host_memory import report, run_script, status_kib
import persimmon_train.parallel.single as single

real_wrap = single.SingleDeviceStrategy.wrap
loaded = {}

def wrap(self, model, make_optimizer):
    result = real_wrap(self, model, make_optimizer)
    loaded["rss"] = status_kib("VmRSS") * 1024
    loaded["peak"] = status_kib("VmHWM") * 1024
    return result

single.SingleDeviceStrategy.wrap = wrap
start = status_kib("VmRSS") * 1024
run_script(sys.argv[1], sys.argv[2:])
report({"start": start, "loaded": loaded, "peak": status_kib("VmHWM") * 1024})
"""


def run(base: Path, out: Path, steps: int, seq_len: int, extra: list[str]) -> dict:
    cmd = [
        sys.executable,
        "-c",
        DRIVER,
        REPO / "recipes" / "finetune.py",
        "strategy=single",
        "peft=lora",
        "peft.dropout=0.0",
        "trainer.precision=bf16",
        f"model.path={base}",
        f"data.seq_len={seq_len}",
        "trainer.micro_batch_size=1",
        f"trainer.max_steps={steps}",
        "trainer.eval_at_start=false",
        "trainer.eval_max_batches=1",
        "trainer.progress_bar=false",
        "checkpoint.every_n_steps=0",
        "export.enabled=false",
        f"output_dir={out}",
        *extra,
    ]
    started = time.perf_counter()
    output = run_measured(cmd, timeout=1800, PERSIMMON_TRAIN_CACHE=str(out.parent / "cache"))
    return {**reported(output), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qlora-memory-") as tmp:
        base = Path(tmp) / "base"
        params = write_base(base, HIDDEN, LAYERS, 0, 1024)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(
            f"Persimmon {params / 1e6:.0f}M parameters, saved in bf16 ({size / 1e6:.0f} MB); strategy=single, "
            f"LoRA r=16 on the 4 decoder matrices, {args.steps} steps of 1 x {args.seq_len} tokens"
        )
        print(f"{'frozen base':>12} {'RSS at start MB':>16} {'after load MB':>14} {'peak MB':>9} {'seconds':>8}")
        rows = {}
        for label, extra in (("bf16", []), ("nf4", ["peft.quantize_base=nf4"])):
            rows[label] = m = run(base, Path(tmp) / label, args.steps, args.seq_len, extra)
            print(
                f"{label:>12} {m['start'] / 1e6:16.0f} {m['loaded']['rss'] / 1e6:14.0f} "
                f"{m['peak'] / 1e6:9.0f} {m['seconds']:8.1f}"
            )
        b, q = rows["bf16"], rows["nf4"]
        mb = 1e6
        load_growth = (q["loaded"]["rss"] - q["start"]) / (b["loaded"]["rss"] - b["start"])
        print(
            f"nf4 - bf16: after load {(q['loaded']['rss'] - b['loaded']['rss']) / mb:+.0f} MB, "
            f"peak {(q['peak'] - b['peak']) / mb:+.0f} MB; nf4 / bf16: peak {q['peak'] / b['peak']:.2f}, "
            f"growth over start: after load {load_growth:.2f}, "
            f"peak {(q['peak'] - q['start']) / (b['peak'] - b['start']):.2f}"
        )


if __name__ == "__main__":
    main()
