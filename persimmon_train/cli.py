"""The shared entry-point wrapper every recipe uses.

`run_recipe("finetune", main)` turns `sys.argv` (Hydra overrides such as `trainer.max_steps=10`)
into a validated `RunConfig`, runs `main(cfg)`, and reports user errors -- `PersimmonTrainError`
and Hydra/OmegaConf config errors -- as ONE line `error: ...` on stderr with exit code 2 and no
traceback. Anything else is a bug and keeps its traceback.

We compose with Hydra's compose API instead of `@hydra.main`: it gives the same config tree and
override grammar, but leaves the working directory and logging alone and lets us own the errors.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable

from persimmon_train.errors import PersimmonTrainError

EXIT_USER_ERROR = 2
CONFIG_DIR_ENV = "PERSIMMON_TRAIN_CONFIG_DIR"


def config_dir() -> Path:
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).resolve()
    return Path(__file__).resolve().parent.parent / "conf"


def strip_local_rank(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local_rank N` (appended by the deepspeed launcher); export LOCAL_RANK."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ["LOCAL_RANK"] = arg.split("=", 1)[1]
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ["LOCAL_RANK"] = argv[i + 1]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("demo"):
        def demo(key: str):
            # Built (deterministically, cached) only when a config actually uses the demo data.
            from persimmon_train.data import demo_assets

            value = getattr(demo_assets(), key)
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value)

        OmegaConf.register_new_resolver("demo", demo)


def compose_config(job: str, overrides: list[str]):
    """Hydra-compose `conf/<job>.yaml` with `overrides`; returns the (unresolved) DictConfig."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from persimmon_train.training.config import register_schema

    register_schema()
    _register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=job):
        return compose(config_name=job, overrides=overrides)


def load_config(job: str, overrides: list[str]):
    """Compose, resolve and validate: returns a `RunConfig` dataclass."""
    from omegaconf import OmegaConf

    from persimmon_train.training.config import validate_run_config

    cfg = compose_config(job, overrides)
    _reject_unknown_keys(cfg)
    return validate_run_config(OmegaConf.to_object(cfg))


def _unknown_keys(node, schema, prefix: str = ""):
    """Keys in the composed config that the dataclass schema has no field for (recursively)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    for key in node.keys():
        if key not in hints:
            yield prefix + str(key)
        elif dataclasses.is_dataclass(hints[key]) and node.get(key) is not None:
            yield from _unknown_keys(node[key], hints[key], f"{prefix}{key}.")


def _reject_unknown_keys(cfg) -> None:
    """Hydra lets `+key=value` add keys even to typed nodes; the schema has no place for them."""
    from persimmon_train.errors import ConfigError
    from persimmon_train.training.config import RunConfig

    unknown = [k for k in _unknown_keys(cfg, RunConfig) if k != "hydra"]
    if unknown:
        raise ConfigError(f"config key '{unknown[0]}': not a known key (see python recipes/<job>.py --print-config)")


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


def format_config_error(exc: BaseException) -> str:
    """One line naming the key, from a Hydra / OmegaConf exception (or its causes)."""
    from omegaconf.errors import OmegaConfBaseException

    chain, seen = [], exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for err in chain:  # the OmegaConf error knows the full key; Hydra's wrapper only says "could not override"
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            msg = (getattr(err, "msg", None) or str(err)).strip().split("\n")[0]
            return _one_line(f"config key '{err.full_key}': {msg}")
    for err in chain:
        if isinstance(err, PersimmonTrainError):
            return _one_line(err)
    first = chain[0]
    text = str(getattr(first, "msg", None) or first or type(first).__name__)
    return _one_line(text.split("Config search path")[0])  # Hydra appends its search path


def _is_config_error(exc: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(exc, (HydraException, OmegaConfBaseException))


def run_recipe(job: str, main: Callable, argv: list[str] | None = None) -> None:
    """Parse overrides for `job`, run `main(cfg)`, and turn user errors into one line + exit 2."""
    args = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    print_only = any(a in ("--cfg", "--print-config") for a in args)
    args = [a for a in args if a not in ("--cfg", "--print-config")]
    if any(a in ("-h", "--help") for a in args):
        print(f"usage: python recipes/{job}.py [key=value ...] [--print-config]\n"
              f"config tree: {config_dir()} (see docs/training.md)")
        return
    try:
        cfg = load_config(job, args)
        if print_only:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            return
        main(cfg)
    except PersimmonTrainError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Exception as exc:
        if _is_config_error(exc):
            print(f"error: {format_config_error(exc)}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        raise
