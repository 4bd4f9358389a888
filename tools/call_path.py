"""How deep a LoRA run goes from the command to Trainer.fit and to final/, and through which modules.

    python tools/call_path.py [--levels N]

Runs `persimmon-train finetune` (the embedded default: LoRA on the tiny model, 2 steps) in this
process under a profiler that sees only persimmon_train's own functions, and prints:
- the chain of calls from the command (`recipes/main.py: main`) to `Trainer.fit` and to the
  export that writes final/, one line a level;
- the modules whose functions run within `--levels` levels of the command (default: the level of
  `Trainer.fit`; imports do not count): what a newcomer reads to follow the run.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PACKAGE = str(REPO / "persimmon_train") + os.sep
TARGETS = {"fit": "Trainer.fit", "final/": "export_checkpoint"}


def trace(argv: list[str]):
    """(chains to each target, {module: smallest level}) of one in-process run of `argv`."""
    from persimmon_train.recipes.main import main

    chains, levels = {}, {}

    def own(frame) -> bool:
        """A function of persimmon_train (not a module or class body run by an import)."""
        return frame.f_code.co_filename.startswith(PACKAGE) and bool(frame.f_code.co_flags & inspect.CO_NEWLOCALS)

    def own_frames(frame):
        """persimmon_train's function frames from the command down to `frame`."""
        out = []
        while frame is not None:
            if own(frame):
                out.append(frame)
            frame = frame.f_back
        return out[::-1]

    def name(frame) -> str:
        module = os.path.relpath(frame.f_code.co_filename, REPO / "persimmon_train")
        return f"{module}: {getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}"

    def profile(frame, event, arg):
        if event != "call" or not own(frame):
            return
        stack = own_frames(frame)
        if stack[0].f_code is not main.__code__:  # run by an import, not by the command
            return
        module = os.path.relpath(frame.f_code.co_filename, REPO / "persimmon_train")
        levels[module] = min(levels.get(module, len(stack)), len(stack))
        qualname = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
        for label, target in TARGETS.items():
            if label not in chains and qualname == target:
                chains[label] = [name(f) for f in stack]

    sys.setprofile(profile)
    try:
        main(argv)
    except SystemExit as exc:
        if exc.code:
            raise
    finally:
        sys.setprofile(None)
    return chains, levels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, default=None, help="list the modules within this many levels")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        argv = [
            "finetune",
            "peft=lora",
            "trainer.max_steps=2",
            "trainer.eval_max_batches=2",
            "trainer.progress_bar=false",
        ]
        argv.append(f"output_dir={out}/run")
        chains, levels = trace(argv)
    for label, chain in chains.items():
        print(f"to {label}: {len(chain)} levels")
        for i, call in enumerate(chain, 1):
            print(f"  {i}. {call}")
    depth = args.levels or len(chains["fit"])
    modules = sorted(m for m, level in levels.items() if level <= depth)
    print(f"modules within {depth} levels: {len(modules)}")
    for module in modules:
        print(f"  {module} (level {levels[module]})")


if __name__ == "__main__":
    main()
