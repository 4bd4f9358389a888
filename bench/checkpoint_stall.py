"""The training stall of a checkpoint, synchronous vs checkpoint.async_save, on a 2-rank FSDP2 run.

    python bench/checkpoint_stall.py [--hidden 512] [--layers 4] [--steps 12]

Runs `recipes/finetune.py strategy=fsdp peft=none` twice through launch/torchrun.sh (2 CPU ranks,
gloo, fp32, a checkpoint every 3 steps), once with synchronous checkpoints and once with
`checkpoint.async_save=true`, and reads each step's wall time from metrics.jsonl (tokens in the
step / tokens_per_sec: the window from one step's log line to the next, so a checkpoint written
after step N lands in step N+1's time). The stall is the mean time of the steps that follow a
checkpoint minus the median time of the others. Both runs happen in one invocation: compare the
ratio, not the seconds (the CPU varies between machines and with the load beside it). Also printed:
the total time of steps 2..N (the background write slows the steps it overlaps on a CPU run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVERY = 3


def step_times(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    times, seen = {}, 0
    for row in rows:
        tokens = row["tokens_seen"] - seen
        seen = row["tokens_seen"]
        times[row["step"]] = tokens / row["tokens_per_sec"]
    return times


def run(out: Path, args, extra: list[str]) -> dict[int, float]:
    bin_dir = Path(sys.executable).parent
    env = dict(
        os.environ,
        NPROC_PER_NODE="2",
        MAX_RESTARTS="0",
        OMP_NUM_THREADS="1",
        TORCHRUN=str(bin_dir / "torchrun"),
        PYTHONPATH=str(REPO),
        PERSIMMON_TRAIN_CACHE=str(out.parent / "cache"),
    )
    cmd = [
        "bash",
        str(REPO / "launch" / "torchrun.sh"),
        "recipes/finetune.py",
        "strategy=fsdp",
        "peft=none",
        "trainer.precision=fp32",
        "trainer.progress_bar=false",
        f"model.hidden_size={args.hidden}",
        f"model.intermediate_size={4 * args.hidden}",
        f"model.num_attention_heads={args.hidden // 64}",
        f"model.num_hidden_layers={args.layers}",
        "data.seq_len=64",
        "trainer.micro_batch_size=4",
        f"trainer.max_steps={args.steps}",
        "trainer.eval_at_start=false",
        "trainer.eval_every_n_steps=0",
        "trainer.eval_max_batches=1",
        f"checkpoint.every_n_steps={EVERY}",
        "checkpoint.keep_last=0",
        "trainer.num_threads=1",
        "export.enabled=false",
        f"output_dir={out}",
        *extra,
    ]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return step_times(out)


def stall(times: dict[int, float]) -> tuple[float, float]:
    after = [t for s, t in times.items() if s > 1 and (s - 1) % EVERY == 0]
    others = [t for s, t in times.items() if s > 1 and (s - 1) % EVERY != 0]
    base = statistics.median(others)
    return statistics.mean(after) - base, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, extra in (("sync", []), ("async", ["checkpoint.async_save=true"])):
            out = Path(tmp) / name
            times = run(out, args, extra)
            results[name] = stall(times)
            size = sum(f.stat().st_size for f in (out / "checkpoints" / f"step_{EVERY}").rglob("*") if f.is_file())
            stall_s, base = results[name]
            print(
                f"{name:>5}: checkpoint {size / 2**20:.0f} MiB, step {base * 1000:.0f} ms, "
                f"stall after a checkpoint {stall_s * 1000:.0f} ms, steps 2-{args.steps} in "
                f"{sum(t for s, t in times.items() if s > 1):.1f} s",
                flush=True,
            )
        print(f"async stall / sync stall: {results['async'][0] / results['sync'][0]:.2f}")


if __name__ == "__main__":
    main()
