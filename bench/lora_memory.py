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
import sys
import tempfile
from pathlib import Path

from host_memory import REPO, int_options, peak_kib, print_big_minus_tiny

HOST_MEMORY = Path(__file__).with_name("host_memory.py")

# host_memory.py's recipe run with every frozen weight held in float32 (hold_frozen_for turned off)
FLOAT32_STORAGE = r"""
import runpy, sys
import persimmon_train.parallel.single as single
single.hold_frozen_for = lambda model, precision: 0
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

HF_PEFT = r"""
import sys
from bench.host_memory import print_peak_at_exit
print_peak_at_exit()
import torch
from peft import LoraConfig, get_peft_model
from transformers import PersimmonForCausalLM
folder, seq, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
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


def peaks_big_and_tiny(args, tiny_hidden: int, commands) -> dict[str, dict[str, int]]:
    """{run: {"big": KiB, "tiny": KiB}}: the peak RSS of each (run, command) that `commands(base,
    out)` yields, over a bf16 base folder of the options' size and a tiny one (`tiny_hidden`, 2
    layers); `out`: a fresh path prefix for the runs' output folders."""
    rows: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        big = write_base(root / "big", args.hidden, args.layers, args.vocab, args.seq)
        tiny = write_base(root / "tiny", tiny_hidden, 2, 0, args.seq)
        print(f"models: {big / 1e6:.1f}M and {tiny / 1e6:.2f}M parameters (bf16 folders)")
        for size in ("big", "tiny"):
            for name, cmd in commands(root / size, root / f"out_{size}"):
                rows.setdefault(name, {})[size] = peak_kib(cmd)
    return rows


def lora_job(folder: Path, seq: int, batch: int, steps: int) -> list[str]:
    """The overrides of a short LoRA run on the bf16 base `folder`: no eval, checkpoint or export."""
    return [
        f"model.path={folder}",
        "peft=lora",
        "peft.dropout=0.0",
        "trainer.precision=bf16",
        f"data.seq_len={seq}",
        f"trainer.micro_batch_size={batch}",
        f"trainer.max_steps={steps}",
        "trainer.eval_at_start=false",
        "trainer.eval_every_n_steps=0",
        "checkpoint.every_n_steps=0",
        "export.enabled=false",
        "data.eval_files=null",
    ]


def size_options(description: str) -> argparse.Namespace:
    """The command line of this bench and bench/dpo_memory.py: the big model's and the run's sizes."""
    parser = argparse.ArgumentParser(description=description)
    return int_options(parser, hidden=1024, layers=8, vocab=32768, seq=512, steps=3, batch=2).parse_args()


def main() -> None:
    args = size_options(__doc__.splitlines()[0])

    def commands(base: Path, out: Path):
        job = [*lora_job(base, args.seq, args.batch, args.steps), "trainer.progress_bar=false"]
        for name in ("ours", "ours_qlora", "float32_storage"):
            extra = ["peft.quantize_base=nf4"] if name == "ours_qlora" else []
            driver = [sys.executable, "-c", FLOAT32_STORAGE] if name == "float32_storage" else [sys.executable]
            yield name, [*driver, HOST_MEMORY, "finetune", *job, *extra, f"output_dir={out}_{name}"]
        yield "transformers+peft", [sys.executable, "-c", HF_PEFT, base, args.seq, args.steps, args.batch]

    # tiny: hidden 128, the smallest width whose matrices NF4 can quantize (multiples of 16384 values)
    rows = peaks_big_and_tiny(args, 128, commands)
    print_big_minus_tiny(rows, "transformers+peft", "vs transformers+peft", width=20)


if __name__ == "__main__":
    main()
