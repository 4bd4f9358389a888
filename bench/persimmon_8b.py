"""Persimmon-8B at its real size on one host: write a random HF folder with the released config,
LoRA-tune it with a bf16 base, export final/ + adapter/, and check the export with transformers.

    python bench/persimmon_8b.py --out /big/disk/p8b [--layers 36] [--seq 512] [--steps 2]
                                 [--extra peft.quantize_base=nf4 ...] [--run-name R] [--no-greedy]
    python bench/persimmon_8b.py --out /big/disk/p8b --check-only   # step 3 on an existing run

1. `DIR/base/`: the released architecture (vocab 262144, hidden 4096, 36 layers, 64 heads,
   intermediate 16384; `--layers N` keeps the real width and vocabulary with fewer layers) with
   random weights, streamed into 2 GB bf16 safetensors shards one tensor at a time (18.8 GB).
2. `recipes/finetune.py model.path=DIR/base peft=lora trainer.precision=bf16` (strategy=single,
   activation checkpointing on every layer), `--steps` steps of one `--seq`-token row, in a fresh
   process. Reported: peak RSS of the training (VmHWM before the export), seconds per step (from
   metrics.jsonl's tokens_per_sec), the planner's estimate the run logged, the export's time (its
   memory is bench/export_memory.py's, measured in a process of its own).
3. The merged `final/` loaded by transformers' PersimmonForCausalLM (bf16) and by ours, one after
   the other (both would not fit beside each other on 24 GB): greedy 8 tokens from the same prompt,
   which must be equal, and the largest difference of the prompt's logits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRIVER = r"""
import json, os, runpy, sys, time
sys.path.insert(0, os.path.join(sys.argv[1], "bench"))
from host_memory import status_kib
import persimmon_train.export.exporter as exporter
real = exporter.export_run_outputs

def measured(result, cfg):
    train_peak, started = status_kib("VmHWM"), time.perf_counter()
    out = real(result, cfg)
    report = {"train_peak_kib": train_peak, "export_seconds": time.perf_counter() - started}
    print("REPORT " + json.dumps(report), file=sys.stderr, flush=True)
    return out

exporter.export_run_outputs = measured
sys.argv = [os.path.join(sys.argv[1], "recipes", "finetune.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_base(folder: Path, layers: int) -> int:
    import torch

    sys.path.insert(0, str(REPO))
    from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM
    from persimmon_train.storage.hf_folder import write_hf_folder
    from tests.helpers import demo_tokenizer

    tokenizer = demo_tokenizer()
    config = PersimmonConfig(
        num_hidden_layers=layers,  # every other default is the released architecture
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in PersimmonForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in shapes.items():
            if name.endswith("layernorm.weight"):
                yield name, torch.ones(shape, dtype=torch.bfloat16)
            elif len(shape) == 1:
                yield name, torch.zeros(shape, dtype=torch.bfloat16)
            else:
                yield name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    write_hf_folder(
        str(folder),
        tensors(),
        architecture="PersimmonForCausalLM",
        config=config,
        tokenizer=tokenizer,
        expected_shapes=shapes,
        dtype=torch.bfloat16,
        max_shard_size="2GB",
        progress_total=len(shapes),
    )
    return sum(int(torch.Size(s).numel()) for s in shapes.values())


def greedy(kind: str, folder: Path, prompt: list[int], logits_file: Path, new: int = 8) -> list[int]:
    """Greedy tokens from `folder` in a fresh process (transformers or ours), bf16, no sampling; the
    prompt's logits go to `logits_file`."""
    code = r"""
import json, sys, torch
kind, folder, prompt, new = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
if kind == "transformers":
    from transformers import PersimmonForCausalLM
    model = PersimmonForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16)
else:
    from persimmon_train.model import PersimmonForCausalLM
    model = PersimmonForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
ids = torch.tensor([prompt])
with torch.no_grad():
    for step in range(new):
        logits = model(input_ids=ids).logits
        if step == 0:
            torch.save(logits[0].float(), sys.argv[5])  # the prompt's logits, compared across the two
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
print(json.dumps(ids[0, len(prompt):].tolist()))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", code, kind, str(folder), json.dumps(prompt), str(new), str(logits_file)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} generation failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--extra", nargs="*", default=[], help="more recipe overrides, e.g. peft.quantize_base=nf4")
    parser.add_argument("--run-name", default="run", help="the run's folder under --out")
    parser.add_argument("--no-greedy", action="store_true", help="skip step 3 (two more 8B loads)")
    parser.add_argument("--check-only", action="store_true", help="step 3 only, on an existing run's final/")
    args = parser.parse_args()
    if args.check_only:
        return check_export(args.out / args.run_name / "final")
    base = args.out / "base"
    if not (base / "config.json").is_file():
        started = time.perf_counter()
        count = write_base(base, args.layers)
        print(f"wrote {base}: {count / 1e9:.2f}B parameters in {time.perf_counter() - started:.0f} s")
    run = args.out / args.run_name
    job = [
        f"model.path={base}",
        "peft=lora",
        "peft.dropout=0.0",
        "trainer.precision=bf16",
        "trainer.activation_checkpointing=1",
        f"data.seq_len={args.seq}",
        "trainer.micro_batch_size=1",
        f"trainer.max_steps={args.steps}",
        "trainer.eval_at_start=false",
        "trainer.eval_every_n_steps=0",
        "trainer.progress_bar=false",
        "data.eval_files=null",
        "export.dtype=bf16",
        "overwrite=true",
        f"output_dir={run}",
        *args.extra,
    ]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, str(REPO), *job], cwd=REPO, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the run failed:\n{proc.stderr[-4000:]}")
    report = json.loads([x for x in proc.stderr.splitlines() if x.startswith("REPORT ")][-1][7:])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step_seconds = [args.seq / r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r]
    gib = 1024 * 1024
    print(f"run: {' '.join(args.extra) or 'LoRA, bf16 base'}, seq {args.seq}, {args.steps} steps, {wall:.0f} s in all")
    print(f"  training peak RSS: {report['train_peak_kib'] / gib:.2f} GiB")
    estimate = [x for x in proc.stderr.splitlines() if "memory estimate per rank" in x]
    print(f"  planner: {estimate[0].split('memory estimate per rank', 1)[1].strip() if estimate else 'not logged'}")
    print(f"  seconds per step:  {', '.join(f'{s:.1f}' for s in step_seconds)}")
    # The export's memory is bench/export_memory.py's (a fresh process): here the trained model is
    # still resident when the export begins, so this process's peak says nothing about the export.
    print(f"  export of final/ and adapter/: {report['export_seconds']:.0f} s")
    if args.no_greedy:
        return
    check_export(run / "final")


def check_export(final: Path) -> None:
    """Step 3: transformers and our model on the exported folder, one after the other."""
    import torch

    prompt = [1, 100, 200, 300, 400]
    ours = greedy("ours", final, prompt, final.parent / "logits_ours.pt")
    theirs = greedy("transformers", final, prompt, final.parent / "logits_transformers.pt")
    a, b = torch.load(final.parent / "logits_ours.pt"), torch.load(final.parent / "logits_transformers.pt")
    print(f"  greedy from final/: ours {ours}, transformers {theirs}: {'equal' if ours == theirs else 'DIFFERENT'}")
    print(
        f"  the prompt's logits ({tuple(a.shape)}, bf16 models): max |ours - transformers| "
        f"{(a - b).abs().max().item():.3g}, logits' max |value| {b.abs().max().item():.3g}"
    )


if __name__ == "__main__":
    main()
