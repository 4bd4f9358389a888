"""`persimmon-train ls` (recipes and the configs each accepts) and `cp CONFIG DEST` (copy one to edit).

The config tree ships inside the package (persimmon_train/conf); a user edits a copy and runs it
the Hydra way: `persimmon-train finetune --config-path DIR --config-name NAME`. The shipped tree
stays on the search path behind DIR (cli.compose_config), so a copied primary config still finds
its groups, and DIR/experiment/NAME.yaml shadows a shipped experiment of that name.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from persimmon_train.cli import EXIT_USER_ERROR, config_dir
from persimmon_train.errors import ConfigError
from persimmon_train.recipes import HYDRA_JOBS, JOBS

# data.format -> the recipe that trains it (evaluate accepts every format).
_FORMAT_JOB = {fmt: name for name, job in JOBS.items() for fmt in job.formats}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _yaml_value(path: Path, key: str) -> str | None:
    """A top-level `key: value` (or `- override /key: value`) from a small YAML file, without parsing it all."""
    match = re.search(rf"^\s*(?:-\s*override\s+/)?{re.escape(key)}:\s*([\w./-]+)", path.read_text(), re.M)
    return match.group(1) if match else None


def _job_of_data(option: str) -> str | None:
    fmt = _yaml_value(config_dir() / "data" / f"{option}.yaml", "format")
    return _FORMAT_JOB.get(fmt)


def _job_of_experiment(option: str) -> str | None:
    data = _yaml_value(config_dir() / "experiment" / f"{option}.yaml", "data")
    return _job_of_data(data) if data else None


def listing() -> str:
    lines = ["recipes (persimmon-train RECIPE [key=value ...]):"]
    for name, job in JOBS.items():
        lines.append(f"  {name:<14} {job.what}")
    lines += ["", f"configs ({config_dir()}), per Hydra recipe (group=option on the command line):"]
    groups = sorted(p.name for p in config_dir().iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    for job in HYDRA_JOBS:
        lines.append(f"  {job}  (config {job}.yaml)")
        for group in groups:
            options = _options(group)
            if job != "evaluate" and group == "data":
                options = [o for o in options if _job_of_data(o) == job]
            elif job != "evaluate" and group == "experiment":
                options = [o for o in options if _job_of_experiment(o) == job]
            if options:
                lines.append(f"    {group + '=':<12} {' | '.join(options)}")
    lines += [
        "",
        "copy one to edit: persimmon-train cp finetune my_run.yaml   (or cp experiment/lora_chat_16k DIR/)",
        "then:             persimmon-train finetune --config-path . --config-name my_run",
    ]
    return "\n".join(lines)


def _source(name: str) -> Path:
    name = name[:-5] if name.endswith(".yaml") else name
    path = config_dir() / f"{name}.yaml"
    if ".." in Path(name).parts or not path.is_file():
        raise ConfigError(
            f"cp: no shipped config {name!r}; `persimmon-train ls` lists them "
            f"(a recipe's config, e.g. finetune, or group/option, e.g. experiment/lora_chat_16k)"
        )
    return path


def copy_config(name: str, dest: str) -> Path:
    """Copy a shipped config to `dest` (a .yaml file, or a folder: keeps group/option.yaml). Never overwrites."""
    src = _source(name)
    rel = src.relative_to(config_dir())
    dest_path = Path(dest).expanduser()
    if dest.endswith(("/", "\\")) or dest_path.is_dir() or not dest_path.suffix:
        target = dest_path / rel
    else:
        if dest_path.suffix not in (".yaml", ".yml"):
            raise ConfigError(f"cp: DEST {dest!r} must be a folder or a .yaml file (Hydra reads .yaml)")
        target = dest_path
        if len(rel.parts) > 1:  # a group option copied to a file: Hydra finds it only under its group folder
            target = dest_path.parent / rel.parent / dest_path.name
    if target.exists():
        raise ConfigError(f"cp: {target} exists; remove it or choose another DEST")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    return target


def _next_step(name: str, target: Path) -> str:
    rel = Path(name[:-5] if name.endswith(".yaml") else name)
    if len(rel.parts) == 1:  # a primary config
        job = rel.name if rel.name in HYDRA_JOBS else "finetune"
        return (
            f"run it: persimmon-train {job} --config-path {target.parent} --config-name {target.stem} [key=value ...]"
        )
    group, root = rel.parts[0], target.parent.parent
    job = {"experiment": _job_of_experiment, "data": _job_of_data}.get(group, lambda _: None)(target.stem)
    return f"use it: persimmon-train {job or 'finetune'} --config-path {root} {group}={target.stem} [key=value ...]"


def run(command: str, argv: list[str]) -> None:
    try:
        if command == "ls":
            if argv and argv[0] not in ("-h", "--help"):
                raise ConfigError(f"ls takes no arguments, got {' '.join(argv)}")
            print(listing())
            return
        if any(a in ("-h", "--help") for a in argv) or len(argv) != 2:
            if len(argv) != 2 and not any(a in ("-h", "--help") for a in argv):
                raise ConfigError(
                    "usage: persimmon-train cp CONFIG DEST (CONFIG: e.g. finetune or "
                    "experiment/lora_chat_16k; DEST: a .yaml file or a folder)"
                )
            print("usage: persimmon-train cp CONFIG DEST")
            return
        target = copy_config(*argv)
        print(f"copied {_source(argv[0])} -> {target}")
        print(_next_step(argv[0], target))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
