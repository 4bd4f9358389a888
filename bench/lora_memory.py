"""Peak host memory of a bf16 LoRA run: ours (frozen base in bf16, and the float32-storage baseline)
against transformers + peft loaded the way their users do, side by side in one run.

    python bench/lora_memory.py [--hidden 1024 --layers 8 --vocab 32768 --seq 512 --steps 3]

Each configuration runs in a fresh process and reports its peak RSS (VmHWM at exit). A Persimmon
of the given size (default ~168M parameters) is written once as a bf16 HF folder, plus a tiny one
(hidden 128, 2 layers) whose run measures everything that is not the model (imports, data,
allocator): the figure compared is the big run's peak minus the tiny run's, per framework.

- ours: `recipes/finetune.py model.path=... peft=lora trainer.precision=bf16` (strategy=single);
- ours, QLoRA: the same with `peft.quantize_base=nf4` (decoder matrices in NF4);
- ours, float32 storage: the same with `hold_frozen_for` turned off (every frozen weight float32);
- transformers + peft: `PersimmonForCausalLM.from_pretrained(torch_dtype=torch.bfloat16)`,
  `get_peft_model` (same r, alpha, targets), AdamW on the adapters, bf16 autocast, same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OURS = r"""
import atexit, json, os, runpy, sys
sys.path.insert(0, os.path.join(sys.argv[1], "bench"))
from host_memory import status_kib
atexit.register(lambda: print("PEAK " + json.dumps(status_kib("VmHWM")), file=sys.stderr, flush=True))
if sys.argv[2] == "float32_storage":
    import persimmon_train.parallel.single as single
    single.hold_frozen_for = lambda model, precision: 0
sys.argv = [os.path.join(sys.argv[1], "recipes", "finetune.py"), *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

HF_PEFT = r"""
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "bench"))
from host_memory import status_kib
import torch
from peft import LoraConfig, get_peft_model
from transformers import PersimmonForCausalLM
folder, seq, steps, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = PersimmonForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
    target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
generator = torch.Generator().manual_seed(0)
for _ in range(steps):
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print("PEAK " + json.dumps(status_kib("VmHWM")), file=sys.stderr, flush=True)
"""


def write_base(folder: Path, hidden: int, layers: int, vocab: int, seq: int) -> int:
    import torch

    sys.path.insert(0, str(REPO))
    from tests.helpers import demo_tokenizer, save_tiny_base, tiny_config

    tokenizer = demo_tokenizer()
    config = tiny_config(
        tokenizer,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        max_position_embeddings=max(seq, 256),
    ).replace(vocab_size=max(vocab, tokenizer.vocab_size))
    return save_tiny_base(folder, tokenizer, config, dtype=torch.bfloat16).num_parameters()


def peak_kib(cmd: list[str]) -> int:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-4000:]}")
    return json.loads([line for line in proc.stderr.splitlines() if line.startswith("PEAK ")][-1][5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sizes = {
            "big": write_base(root / "big", args.hidden, args.layers, args.vocab, args.seq),
            # hidden 128: the smallest width whose matrices NF4 can quantize (multiples of 16384 values)
            "tiny": write_base(root / "tiny", 128, 2, 0, args.seq),
        }
        print(f"models: {sizes['big'] / 1e6:.1f}M and {sizes['tiny'] / 1e6:.2f}M parameters (bf16 folders)")
        rows = {}
        for size in ("big", "tiny"):
            folder = root / size
            job = [
                f"model.path={folder}",
                "peft=lora",
                "peft.dropout=0.0",
                "trainer.precision=bf16",
                f"data.seq_len={args.seq}",
                f"trainer.micro_batch_size={args.batch}",
                f"trainer.max_steps={args.steps}",
                "trainer.eval_at_start=false",
                "trainer.eval_every_n_steps=0",
                "trainer.progress_bar=false",
                "checkpoint.every_n_steps=0",
                "export.enabled=false",
                "data.eval_files=null",
            ]
            for name in ("ours", "ours_qlora", "float32_storage"):
                out = root / f"{name}_{size}"
                extra = ["peft.quantize_base=nf4"] if name == "ours_qlora" else []
                cmd = [sys.executable, "-c", OURS, str(REPO), name, *job, *extra, f"output_dir={out}"]
                rows.setdefault(name, {})[size] = peak_kib(cmd)
            sizes_args = [str(args.seq), str(args.steps), str(args.batch)]
            cmd = [sys.executable, "-c", HF_PEFT, str(REPO), str(folder), *sizes_args]
            rows.setdefault("transformers+peft", {})[size] = peak_kib(cmd)
    print(f"{'':20s} {'peak big MB':>12s} {'peak tiny MB':>13s} {'big - tiny MB':>14s} {'vs transformers+peft':>21s}")
    reference = rows["transformers+peft"]["big"] - rows["transformers+peft"]["tiny"]
    for name, row in rows.items():
        above = row["big"] - row["tiny"]
        big, tiny = row["big"] / 1024, row["tiny"] / 1024
        print(f"{name:20s} {big:12.0f} {tiny:13.0f} {above / 1024:14.0f} {above / reference:20.2f}x")


if __name__ == "__main__":
    main()
