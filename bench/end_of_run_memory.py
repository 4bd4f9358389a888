"""Host memory of rank 0 at the end of a 2-rank FSDP full fine-tune: streaming export vs full gather.

    python bench/end_of_run_memory.py [--old-checkout DIR]

Trains a ~870 MB (fp32) Persimmon for 1 step with `strategy=fsdp peft=none` on 2 CPU ranks
(torchrun, gloo) and measures, on rank 0, the peak RSS growth over the end of the run: from just
before the final model is written to just after (VmHWM reset there through /proc/self/clear_refs).

- this checkout: the run ends with a checkpoint; rank 0 exports it from disk, tensor by tensor
  (`persimmon_train.export.exporter.export_run_outputs`);
- `--old-checkout DIR` (e.g. a worktree of commit 1bb4e21): the end of the run gathers the full
  state dict onto rank 0 and merges in memory (`training.export.export_final_model`).
Both runs use the same config and print one line each; compare them in one run (ratios).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from host_memory import reported, run_measured

HOOKS = {  # module, function wrapped around the end-of-run write of final/
    "new": ("persimmon_train.export.exporter", "export_run_outputs"),
    "old": ("persimmon_train.training.run", "export_final_model"),  # run.py's own binding
}

DRIVER = r"""
import importlib, os, sys
checkout, kind, module_name, function = sys.argv[1:5]
sys.path.insert(0, checkout)
from host_memory import report, reset_peak, run_script, status_kib  # copied beside this driver
module = importlib.import_module(module_name)
real = getattr(module, function)

def measured(*args, **kwargs):
    reset_peak()  # VmHWM := current RSS
    before = status_kib("VmRSS") * 1024
    result = real(*args, **kwargs)
    if int(os.environ.get("RANK", "0")) == 0:
        report({"before": before, "peak": status_kib("VmHWM") * 1024})
    return result

setattr(module, function, measured)
run_script(os.path.join(checkout, "recipes", "finetune.py"), sys.argv[5:])
"""

HIDDEN, LAYERS, VOCAB = 1024, 12, 32768  # ~218M parameters, 0.87 GB fp32: well above the run's other memory
JOB = [
    "trainer.precision=fp32",
    "trainer.progress_bar=false",
    "peft=none",
    "strategy=fsdp",
    f"model.hidden_size={HIDDEN}",
    f"model.intermediate_size={4 * HIDDEN}",
    f"model.num_hidden_layers={LAYERS}",
    "model.num_attention_heads=16",
    f"model.vocab_size={VOCAB}",
    "data.seq_len=64",
    "trainer.micro_batch_size=1",
    "trainer.max_steps=1",
    "trainer.eval_at_start=false",
    "trainer.eval_every_n_steps=0",
    "trainer.eval_max_batches=1",
    "checkpoint.every_n_steps=0",
    "export.dtype=fp32",
]


def measure(checkout: Path, kind: str, out: Path) -> dict:
    driver = out.parent / f"driver_{kind}.py"
    driver.write_text(DRIVER)
    shutil.copy(Path(__file__).with_name("host_memory.py"), driver.parent)  # old checkouts lack it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", driver, checkout, kind]
    cmd += [*HOOKS[kind], *JOB, f"output_dir={out}"]
    return reported(run_measured(cmd, threads="1", pythonpath=checkout, timeout=1800))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-checkout", type=Path, help="a checkout whose runs end with the full gather")
    args = parser.parse_args()
    here = Path(__file__).resolve().parents[1]
    rows = [("streaming export of the last checkpoint", here, "new")]
    if args.old_checkout:
        rows.append(("full gather onto rank 0 (old)", args.old_checkout.resolve(), "old"))
    model_mb = 4 * (2 * VOCAB * HIDDEN + LAYERS * 12 * HIDDEN * HIDDEN) / 1e6  # weights, roughly
    print(f"2-rank FSDP full fine-tune, ~{model_mb:.0f} MB fp32 model; rank 0 peak RSS over the end of the run")
    print(f"{'end of run':>42} {'RSS before MB':>14} {'peak MB':>9} {'growth MB':>10} {'growth/model':>13}")
    with tempfile.TemporaryDirectory(prefix="end-of-run-") as tmp:
        for label, checkout, kind in rows:
            memory = measure(checkout, kind, Path(tmp) / kind)
            growth = (memory["peak"] - memory["before"]) / 1e6
            print(
                f"{label:>42} {memory['before'] / 1e6:14.0f} {memory['peak'] / 1e6:9.0f} {growth:10.0f} "
                f"{growth / model_mb:13.2f}"
            )


if __name__ == "__main__":
    main()
