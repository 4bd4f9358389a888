"""Peak host memory of LoRA DPO against LoRA SFT at the same tokens per step: one model in memory.

    python bench/dpo_memory.py [--hidden 1024 --layers 8 --vocab 32768 --seq 512 --steps 3 --batch 2]

Both run our recipes on the same bf16 base folder (written once, as bench/lora_memory.py does),
with `peft=lora`, `trainer.precision=bf16`, the same `data.seq_len` and micro-batch (so the same
tokens per step): `finetune` on the demo chat data, `dpo` on the demo preference pairs (its
reference: the same model with adapters disabled). Each run is a fresh process reporting its peak
RSS (VmHWM at exit); a tiny base (hidden 64, 2 layers) measures what is not the model, and the
figure compared is big - tiny per recipe. Issue 20's bar: DPO within 10% of SFT.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from lora_memory import peak_kib, write_base  # noqa: E402

RUN = r"""
import atexit, json, os, runpy, sys
sys.path.insert(0, os.path.join(sys.argv[1], "bench"))
from host_memory import status_kib
atexit.register(lambda: print("PEAK " + json.dumps(status_kib("VmHWM")), file=sys.stderr, flush=True))
sys.argv = [os.path.join(sys.argv[1], "recipes", sys.argv[2] + ".py"), *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    rows: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sizes = {
            "big": write_base(root / "big", args.hidden, args.layers, args.vocab, args.seq),
            "tiny": write_base(root / "tiny", 64, 2, 0, args.seq),
        }
        print(f"models: {sizes['big'] / 1e6:.1f}M and {sizes['tiny'] / 1e6:.2f}M parameters (bf16 folders)")
        for size in ("big", "tiny"):
            job = [
                f"model.path={root / size}",
                "peft=lora",
                "peft.dropout=0.0",
                "trainer.precision=bf16",
                f"data.seq_len={args.seq}",
                f"trainer.micro_batch_size={args.batch}",
                f"trainer.max_steps={args.steps}",
                "trainer.eval_at_start=false",
                "trainer.eval_every_n_steps=0",
                "trainer.progress_bar=false",
                "trainer.check_memory=false",
                "checkpoint.every_n_steps=0",
                "export.enabled=false",
                "data.eval_files=null",
            ]
            for recipe in ("finetune", "dpo"):
                out = root / f"{recipe}_{size}"
                cmd = [sys.executable, "-c", RUN, str(REPO), recipe, *job, f"output_dir={out}"]
                rows.setdefault(recipe, {})[size] = peak_kib(cmd)
    tokens = args.seq * args.batch
    print(f"tokens per step: {tokens} ({args.batch} rows x {args.seq})")
    print(f"{'':10s} {'peak big MB':>12s} {'peak tiny MB':>13s} {'big - tiny MB':>14s} {'vs LoRA SFT':>12s}")
    reference = rows["finetune"]["big"] - rows["finetune"]["tiny"]
    for name, row in rows.items():
        above = row["big"] - row["tiny"]
        big, tiny = row["big"] / 1024, row["tiny"] / 1024
        print(f"{name:10s} {big:12.0f} {tiny:13.0f} {above / 1024:14.0f} {above / reference:11.2f}x")


if __name__ == "__main__":
    main()
