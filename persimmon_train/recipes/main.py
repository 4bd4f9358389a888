"""The `persimmon-train` console command: one sub-command per recipe, plus `ls` and `cp`.

    persimmon-train finetune [key=value ...] [-m] [--config-path DIR --config-name NAME]
    persimmon-train ls                     recipes and the configs each accepts
    persimmon-train cp CONFIG DEST         copy a shipped config to edit

Each sub-command is the module's `run(argv)`, exactly what `python recipes/<job>.py` runs.
"""

from __future__ import annotations

import importlib
import sys

from persimmon_train.cli import EXIT_USER_ERROR
from persimmon_train.recipes import JOBS

USAGE = """usage: persimmon-train COMMAND [ARGS ...]

commands:
{jobs}
  ls               the recipes and the configs each accepts
  cp CONFIG DEST   copy a shipped config (e.g. finetune, experiment/lora_chat_16k) to edit,
                   then run it with --config-path DIR --config-name NAME

`persimmon-train COMMAND --help` shows a command's arguments."""


def usage() -> str:
    return USAGE.format(jobs="\n".join(f"  {name:<16} {what}" for name, (_, what) in JOBS.items()))


def main(argv: list[str] | None = None) -> None:
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
    module = JOBS.get(command, (None,))[0] or JOBS.get(command.replace("_", "-"), (None,))[0]
    if module is None:
        print(f"error: unknown command {command!r}; one of {', '.join([*JOBS, 'ls', 'cp'])}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    importlib.import_module(f"persimmon_train.recipes.{module}").run(rest)


if __name__ == "__main__":
    main()
