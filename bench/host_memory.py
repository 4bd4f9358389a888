"""Host memory, read from /proc/self (Linux), and the rest the benches in this folder share: the
one reader for them and the memory tests (tests import it as `bench.host_memory`; a bench script
run as `python bench/x.py` imports it as `host_memory`, its own folder being first on sys.path).

Fields are /proc/self/status names: VmRSS (resident now), VmHWM (peak resident), RssAnon (heap,
ours), RssFile / RssShmem (file-backed and shared pages: memory-mapped files, page cache).

A measured run is a fresh process: `python bench/host_memory.py RECIPE [key=value ...]` (also
under torchrun or the deepspeed launcher, one per rank) runs recipes/RECIPE.py and prints
`PEAK <VmHWM KiB>` at exit; `peak_kib(cmd)` starts such a command and reads the largest PEAK back.
A driver that measures something else prints `report({...})` and the bench reads `reported(output)`.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import runpy
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # where this file is in the checkout (drivers copy it elsewhere)
REPORT = "BENCH_REPORT "


def status_kib(field: str) -> int:
    """/proc/self/status `field` in KiB (0 where the kernel does not report it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Set VmHWM to the current VmRSS, so a later VmHWM measures what ran since. False where
    /proc/self/clear_refs is not writable (some containers): VmHWM then still holds older peaks."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Peak VmRSS (KiB) seen by a background thread polling every millisecond until stop(): the
    fallback where reset_peak() is refused. It sees any peak that lasts longer than a poll."""

    def __init__(self):
        self.peak, self.done = status_kib("VmRSS"), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, status_kib("VmRSS"))

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return max(self.peak, status_kib("VmRSS"))


# ------------------------------------------------------------------------------------------------
# measured processes


def print_peak_at_exit() -> None:
    """At this process's exit, print `PEAK <VmHWM KiB>` to stderr (what `peak_kib` reads)."""
    atexit.register(lambda: print(f"PEAK {status_kib('VmHWM')}", file=sys.stderr, flush=True))


def report(values: dict) -> None:
    """Print `values` for the bench that started this process (`reported` reads them back)."""
    print(REPORT + json.dumps(values), flush=True)


def run_script(path, args: list[str]) -> None:
    """Run the script `path` in this process as `python path *args` would; a clean exit returns."""
    sys.argv = [str(path), *args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise


def run_measured(cmd: list, *, threads: str | None = None, pythonpath=REPO, timeout=None, **env) -> str:
    """Run `cmd` from the checkout and return its stdout and stderr; a failure stops the bench with
    the end of its stderr. OMP_NUM_THREADS: `threads`, else the caller's, else 2; no tracker
    reaches the network; PYTHONPATH: `pythonpath` alone; `env`: more variables."""
    cmd = [str(c) for c in cmd]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(pythonpath), **env)
    env["OMP_NUM_THREADS"] = threads or os.environ.get("OMP_NUM_THREADS", "2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        named = " ".join("DRIVER" if "\n" in c else c for c in cmd[:6])  # a `-c` driver's code: its name
        raise SystemExit(f"{named} ... failed:\n{proc.stderr[-4000:]}")
    return proc.stdout + "\n" + proc.stderr


def peak_kib(cmd: list, **kwargs) -> int:
    """Peak RSS (VmHWM at exit, KiB) of the process(es) `cmd` starts: the largest rank's PEAK line
    (ranks' lines may interleave: the deepspeed launcher relays each rank's output)."""
    return max(int(kib) for kib in re.findall(r"PEAK (\d+)", run_measured(cmd, **kwargs)))


def reported(output: str) -> dict:
    """The values a measured process printed with `report`."""
    return json.loads(next(line for line in output.splitlines() if line.startswith(REPORT))[len(REPORT) :])


# ------------------------------------------------------------------------------------------------
# command lines and tables


def int_options(parser: argparse.ArgumentParser, **defaults: int) -> argparse.ArgumentParser:
    """Add an integer option `--NAME` (default: the value) for each keyword, in order."""
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    return parser


def print_big_minus_tiny(rows: dict[str, dict[str, int]], reference: str, title: str, width: int) -> None:
    """A table of each run's peaks (KiB) with a big and a tiny model, their difference (what is the
    model) and that difference over the `reference` row's (column `title`); names `width` wide."""
    print(f"{'':{width}s} {'peak big MB':>12s} {'peak tiny MB':>13s} {'big - tiny MB':>14s} {title:>{len(title) + 1}s}")
    base = rows[reference]["big"] - rows[reference]["tiny"]
    for name, row in rows.items():
        above = row["big"] - row["tiny"]
        big, tiny = row["big"] / 1024, row["tiny"] / 1024
        print(f"{name:{width}s} {big:12.0f} {tiny:13.0f} {above / 1024:14.0f} {above / base:{len(title)}.2f}x")


if __name__ == "__main__":
    # python bench/host_memory.py RECIPE [key=value ...]; the deepspeed launcher adds --local_rank
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    print_peak_at_exit()
    run_script(REPO / "recipes" / f"{args[0]}.py", args[1:])
