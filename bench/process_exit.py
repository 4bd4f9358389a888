"""How long a recipe process takes to exit, with and without the garbage collector frozen at its end.

    python bench/process_exit.py [--repeats 4] [key=value ...]

Runs the same tiny `finetune` (2 steps, warm data cache, one thread) through persimmon_train's
`main` twice over, alternately in one run (these machines are noisy: compare the ratio):
- `freeze`: as `python recipes/finetune.py` and the console command run it (main registers
  gc.freeze to run at exit);
- `no freeze`: the same, with that exit hook unregistered after the job.
Each child prints, on stderr, when the entry returned; the bench measures the wall time to the
process's end and reports both and the exit's share (wall - job).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The embedded default's tiny model and demo data, 2 steps, no eval or checkpoint.
TINY = [
    "trainer.max_steps=2",
    "trainer.eval_at_start=false",
    "trainer.eval_every_n_steps=0",
    "checkpoint.every_n_steps=0",
    "trainer.num_threads=1",
    "trainer.progress_bar=false",
]
# The child's clock starts at its first line; the job's end is printed as JOB_DONE <seconds>.
WRAP = (
    "import atexit, gc, time, sys; t0 = time.time(); sys.path.insert(0, {repo!r})\n"
    "from persimmon_train.recipes.main import main\n"
    "try:\n    main(['finetune', *sys.argv[1:]])\n"
    "finally:\n    print('JOB_DONE %.3f' % (time.time() - t0), file=sys.stderr, flush=True)\n"
)
UNHOOK = "atexit.unregister(gc.freeze)\n"


def run_once(entry: str, out: Path, overrides: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, seconds until the job returned) of one child."""
    code = WRAP.format(repo=str(REPO)) + (UNHOOK if entry == "no freeze" else "")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *overrides, f"output_dir={out}"], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{entry} run failed:\n{proc.stderr[-3000:]}")
    job = float(proc.stderr.rsplit("JOB_DONE ", 1)[1].split()[0])
    return wall, job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="process_exit_"))
    env = dict(os.environ, PERSIMMON_TRAIN_CACHE=str(root / "cache"), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    overrides = [*TINY, *args.overrides]
    run_once("freeze", root / "warm", overrides, env)  # prepares the data cache
    results: dict[str, list[tuple[float, float]]] = {"no freeze": [], "freeze": []}
    for i in range(args.repeats):
        for entry in list(results)[:: 1 if i % 2 == 0 else -1]:  # each arm first in half the rounds
            results[entry].append(run_once(entry, root / f"{entry.replace(' ', '_')}_{i}", overrides, env))
    print(f"{'entry':<14} {'wall s (median)':>16} {'job s':>8} {'exit s':>8}")
    exits = {}
    for entry, rows in results.items():
        wall = statistics.median(w for w, _ in rows)
        job = statistics.median(j for _, j in rows)
        exits[entry] = statistics.median(w - j for w, j in rows)
        print(f"{entry:<14} {wall:>16.2f} {job:>8.2f} {exits[entry]:>8.2f}")
    ratio = statistics.median(w for w, _ in results["freeze"]) / statistics.median(w for w, _ in results["no freeze"])
    print(f"freeze / no freeze wall: {ratio:.3f}; exit {exits['freeze']:.2f} s vs {exits['no freeze']:.2f} s")


if __name__ == "__main__":
    main()
