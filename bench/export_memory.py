"""Peak host memory and time of a merged LoRA export over a real-width base folder.

    python bench/export_memory.py --base DIR [--out DIR] [--r 16] [--dtype bf16]

DIR is an HF Persimmon folder (e.g. `DIR/base` written by bench/persimmon_8b.py: the released
width and vocabulary). A LoRA checkpoint as a `strategy=single` run writes it (random adapters on
the four decoder matrices of every layer, storage's own checkpoint writer) is exported by
`recipes/export.py` in a fresh process, which resets VmHWM after its imports and reports the peak
RSS growth over the export, its wall time, and the files written. No training: the export alone,
so the number is the export's whatever the machine's load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from host_memory import REPO, reported, run_measured

DRIVER = r"""
import os, runpy, sys, time
import torch, safetensors, omegaconf  # noqa: F401  (imports are not the export's memory)
import persimmon_train.export.exporter, persimmon_train.data  # noqa: F401
from bench.host_memory import report, reset_peak, status_kib
recipe = runpy.run_path(os.path.join(sys.argv[1], "recipes", "export.py"), run_name="export_recipe")
assert reset_peak(), "/proc/self/clear_refs refused: VmHWM would hold the imports' peak"
before, started = status_kib("VmRSS"), time.perf_counter()
recipe["main"](sys.argv[2:])
report({"before_kib": before, "peak_kib": status_kib("VmHWM"), "seconds": time.perf_counter() - started})
"""

MODULES = ("self_attn.query_key_value", "self_attn.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def write_lora_checkpoint(root: Path, base: Path, r: int) -> str:
    import torch
    from safetensors.torch import save_file

    from persimmon_train.data import Tokenizer
    from persimmon_train.model import PersimmonConfig
    from persimmon_train.storage.checkpoints import LocalComm, save_checkpoint

    config = PersimmonConfig.from_json_file(base)
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes = {  # (in, out) of each adapted matrix
        "self_attn.query_key_value": (hidden, 3 * hidden),
        "self_attn.dense": (hidden, hidden),
        "mlp.dense_h_to_4h": (hidden, inner),
        "mlp.dense_4h_to_h": (inner, hidden),
    }
    g = torch.Generator().manual_seed(0)
    weights = {}
    for layer in range(config.num_hidden_layers):
        for module, (n_in, n_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            weights[f"{prefix}.lora_A.default.weight"] = torch.randn(r, n_in, generator=g) / n_in**0.5
            weights[f"{prefix}.lora_B.default.weight"] = torch.randn(n_out, r, generator=g) * 1e-3
    metadata = {
        "task": "causal_lm",
        "strategy": {"name": "single", "world_size": 1},
        "peft": {
            "method": "lora",
            "r": r,
            "alpha": 2.0 * r,
            "dropout": 0.0,
            "use_rslora": False,
            "modules_to_save": [],
            "target_modules": [m.split(".")[1] for m in MODULES],
        },
        "model": {"architecture": "PersimmonForCausalLM", "config": config.to_dict(), "base": {"path": str(base)}},
    }

    def write_files(folder):
        save_file(weights, os.path.join(folder, "model.safetensors"))
        Tokenizer(str(base)).save_pretrained(os.path.join(folder, "tokenizer"))

    return save_checkpoint(str(root), 1, comm=LocalComm(), write_files=write_files, metadata=metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path)
    parser.add_argument("--out", type=Path, help="a folder for the temporary checkpoint and export (default: /tmp)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        root = Path(tmp)
        step = write_lora_checkpoint(root / "run", args.base.resolve(), args.r)
        out = root / "final"
        started = time.perf_counter()
        cmd = [sys.executable, "-c", DRIVER, REPO, f"checkpoint={step}", f"output_dir={out}", f"dtype={args.dtype}"]
        report = reported(run_measured(cmd))
        files = sorted(p.name for p in out.iterdir() if p.name.endswith(".safetensors"))
        size = sum((out / name).stat().st_size for name in files)
        growth = (report["peak_kib"] - report["before_kib"]) / 2**20
        print(f"base {args.base}: exported {size / 2**30:.2f} GiB in {len(files)} file(s), dtype {args.dtype}")
        print(f"  export: {report['seconds']:.0f} s ({time.perf_counter() - started:.0f} s with the process start)")
        print(f"  peak RSS growth over the export: {growth:.2f} GiB")


if __name__ == "__main__":
    main()
