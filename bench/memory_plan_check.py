"""The memory planner against measured peaks on CPU: estimate vs peak RSS (VmHWM), side by side.

    python bench/memory_plan_check.py [--cases demo lora170m qlora170m fsdp2 single_full zero3] [--seq 512 --steps 3]

Each case runs a training recipe in a fresh process (under torchrun / the deepspeed launcher for
the distributed ones) and reports VmHWM at exit (the largest rank's); the estimate is
`training/memory_plan.plan_memory` for the same overrides, world size and resolved precision,
computed here from the config alone. The planner's fixed "runtime" term (Python, torch, data) is
RUNTIME_CPU_BYTES, measured once on the demo run. Results: docs/benchmarks.md ("Memory planner").

- demo: `recipes/finetune.py` with its defaults (the embedded default run, export included);
- lora170m: a ~168M-parameter Persimmon written in bf16 (bench/lora_memory.py's `write_base`),
  LoRA, trainer.precision=bf16, seq 512, micro-batch 2;
- qlora170m: the same with peft.quantize_base=nf4 (QLoRA: the decoder's frozen matrices in NF4);
- fsdp2: 2-rank FSDP2 full fine-tuning (gloo, float32) of a 59M-parameter random init;
- single_full: the same model and settings in one process (strategy=single);
- zero3: the same model under DeepSpeed ZeRO-3, 2 ranks (CPU accelerator; the first run builds
  DeepSpeed's shared-memory op: do not interrupt it, a killed build leaves a lock file in
  ~/.cache/torch_extensions that makes later runs wait).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from pathlib import Path

from host_memory import REPO, peak_kib

sys.path.insert(0, str(REPO))

QUIET = [
    "trainer.progress_bar=false",
    "tracker=none",
]
SMALL_FULL = [
    "peft=none",
    "model.hidden_size=512",
    "model.intermediate_size=2048",
    "model.num_hidden_layers=8",
    "model.num_attention_heads=8",
    "model.vocab_size=32768",
    "trainer.precision=fp32",
    "data.seq_len=256",
    "trainer.micro_batch_size=2",
    "trainer.max_steps=3",
    "trainer.eval_at_start=false",
    "trainer.eval_every_n_steps=0",
    "checkpoint.every_n_steps=0",
    "export.enabled=false",
    "data.eval_files=null",
]


def estimate(overrides: list[str], world_size: int) -> tuple[int, str]:
    import torch

    from persimmon_train.cli import load_config
    from persimmon_train.parallel.single import resolve_precision
    from persimmon_train.training.memory_plan import plan_memory, run_model_config

    cfg = load_config("finetune", overrides)
    precision = resolve_precision(cfg.trainer.precision, torch.device("cpu"))
    plan = plan_memory(cfg, run_model_config(cfg), world_size, "cpu", precision)
    return plan.total, plan.table()


def measured(overrides: list[str], launcher: str, ranks: int) -> int:
    """Peak VmHWM in bytes (the largest rank's) of `recipes/finetune.py overrides`."""
    with socket.socket() as probe:  # a free rendezvous port: never join another job's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = [REPO / "bench" / "host_memory.py", "finetune", *overrides]
    if launcher == "python":
        cmd = [sys.executable, *run]
    elif launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={ranks}",
            f"--master_port={port}",
            *run,
        ]
    else:
        cmd = [Path(sys.executable).parent / "deepspeed", f"--num_gpus={ranks}", f"--master_port={port}", *run]
    return peak_kib(cmd, threads="1" if ranks > 1 else "2", timeout=900) * 1024


def cases(tmp: Path, args) -> dict[str, tuple[list[str], str, int]]:
    out = {"demo": ([f"output_dir={tmp / 'demo'}"], "python", 1)}
    if {"lora170m", "qlora170m"} & set(args.cases):
        from lora_memory import lora_job, write_base

        folder = tmp / "base170m"
        write_base(folder, 1024, 8, 32768, args.seq)
        job = lora_job(folder, args.seq, 2, args.steps)
        out["lora170m"] = ([*job, f"output_dir={tmp / 'lora170m'}"], "python", 1)
        out["qlora170m"] = ([*job, "peft.quantize_base=nf4", f"output_dir={tmp / 'qlora170m'}"], "python", 1)
    out["fsdp2"] = ([*SMALL_FULL, "strategy=fsdp", f"output_dir={tmp / 'fsdp2'}"], "torchrun", 2)
    out["zero3"] = ([*SMALL_FULL, "strategy=deepspeed", "strategy.stage=3", f"output_dir={tmp / 'zero3'}"], "ds", 2)
    out["single_full"] = ([*SMALL_FULL, f"output_dir={tmp / 'single_full'}"], "python", 1)
    return {name: case for name, case in out.items() if name in args.cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", nargs="+", default=["demo", "lora170m", "qlora170m", "fsdp2", "single_full", "zero3"]
    )
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tables", action="store_true", help="print each case's full breakdown")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (overrides, launcher, ranks) in cases(Path(tmp), args).items():
            est, table = estimate([*QUIET, *overrides], ranks)
            peak = measured([*QUIET, *overrides], launcher, ranks)
            rows.append((name, est, peak))
            if args.tables:
                print(f"--- {name}\n{table}")
            print(
                f"{name:12s} estimate {est / 1e9:6.2f} GB  measured {peak / 1e9:6.2f} GB  "
                f"{100 * (est - peak) / peak:+6.1f}%",
                flush=True,
            )
    print(f"\n{'case':12s} {'estimate GB':>12s} {'measured GB':>12s} {'error':>8s}")
    for name, est, peak in rows:
        print(f"{name:12s} {est / 1e9:12.2f} {peak / 1e9:12.2f} {100 * (est - peak) / peak:+7.1f}%")


if __name__ == "__main__":
    main()
