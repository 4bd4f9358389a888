"""The `persimmon-train` console command: one sub-command per job (`JOBS`), plus `ls` and `cp`.

    persimmon-train finetune [key=value ...] [-m] [--config-path DIR --config-name NAME]
    persimmon-train ls                     recipes and the configs each accepts
    persimmon-train cp CONFIG DEST         copy a shipped config to edit

A Hydra job goes straight to `cli.run_recipe` with its function (recipes/train.py's train, or
training/run.py's evaluate); another command to its module's `run(argv)`.
`python recipes/<job>.py ...` is `main([<job>, ...])`.
"""

from __future__ import annotations

import atexit
import functools
import gc
import importlib
import sys

from persimmon_train.cli import EXIT_USER_ERROR, run_recipe
from persimmon_train.recipes import JOBS

USAGE = """usage: persimmon-train COMMAND [ARGS ...]

commands:
{jobs}
  ls               the recipes and the configs each accepts
  cp CONFIG DEST   copy a shipped config (e.g. finetune, experiment/lora_chat_16k) to edit,
                   then run it with --config-path DIR --config-name NAME

`persimmon-train COMMAND --help` shows a command's arguments."""


def usage() -> str:
    return USAGE.format(jobs="\n".join(f"  {name:<16} {job.what}" for name, job in JOBS.items()))


def main(argv: list[str] | None = None) -> None:
    # When the process ends (the console command, `python -m`, `python recipes/<job>.py`, every
    # rank of a launch), freeze the garbage collector's view of what is alive before the
    # interpreter's shutdown walks the ~10^6 objects torch, transformers and peft leave, pass after
    # pass: 1.28 s of a tiny run's 7.9 s on 2 cores (bench/process_exit.py). Atexit handlers
    # registered earlier (logging) still run, as does every free by reference count; only cyclic
    # garbage is left to the OS. Registered once, however often main runs in one process (tests).
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        if not argv:
            sys.exit(EXIT_USER_ERROR)
        return
    command, rest = argv[0], argv[1:]
    if command in ("ls", "cp"):
        from persimmon_train.recipes import configs

        configs.run(command, rest)
        return
    job = JOBS.get(command) or JOBS.get(command.replace("_", "-"))
    if job is None:
        print(f"error: unknown command {command!r}; one of {', '.join([*JOBS, 'ls', 'cp'])}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if job.runs in ("train", "evaluate"):
        from persimmon_train.recipes.sweep import run_sweep
        from persimmon_train.recipes.train import train
        from persimmon_train.training.run import evaluate

        entry = train if job.runs == "train" else evaluate
        run_recipe(command, functools.partial(entry, job=command), rest, multirun=run_sweep)
        return
    importlib.import_module(f"persimmon_train.recipes.{job.runs}").run(rest)


if __name__ == "__main__":
    main()
