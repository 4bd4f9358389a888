"""Peak host memory of LoRA DPO against LoRA SFT at the same tokens per step: one model in memory.

    python bench/dpo_memory.py [--hidden 1024 --layers 8 --vocab 32768 --seq 512 --steps 3 --batch 2]

Both run our recipes on the same bf16 base folder (written once, as bench/lora_memory.py does),
with `peft=lora`, `trainer.precision=bf16`, the same `data.seq_len` and micro-batch (so the same
tokens per step): `finetune` on the demo chat data, `dpo` on the demo preference pairs (its
reference: the same model with adapters disabled). Each run is a fresh process reporting its peak
RSS (VmHWM at exit); a tiny base (hidden 64, 2 layers) measures what is not the model, and the
figure compared is big - tiny per recipe. The bar: DPO within 10% of SFT.
"""

from __future__ import annotations

import sys
from pathlib import Path

from host_memory import print_big_minus_tiny
from lora_memory import HOST_MEMORY, lora_job, peaks_big_and_tiny, size_options


def main() -> None:
    args = size_options(__doc__.splitlines()[0])

    def commands(base: Path, out: Path):
        job = lora_job(base, args.seq, args.batch, args.steps)
        job += ["trainer.progress_bar=false", "trainer.check_memory=false"]
        for recipe in ("finetune", "dpo"):
            yield recipe, [sys.executable, HOST_MEMORY, recipe, *job, f"output_dir={out}_{recipe}"]

    rows = peaks_big_and_tiny(args, 64, commands)
    print(f"tokens per step: {args.seq * args.batch} ({args.batch} rows x {args.seq})")
    print_big_minus_tiny(rows, "finetune", "vs LoRA SFT", width=10)


if __name__ == "__main__":
    main()
