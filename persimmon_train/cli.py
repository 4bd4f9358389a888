"""The shared entry-point wrapper every recipe uses.

`run_recipe("finetune", main)` turns `sys.argv` (Hydra overrides such as `trainer.max_steps=10`)
into a validated `RunConfig`, runs `main(cfg)`, and reports user errors -- `PersimmonTrainError`
and Hydra/OmegaConf config errors -- as ONE line `error: ...` on stderr with exit code 2 and no
traceback. Anything else is a bug and keeps its traceback. A run that stops early on request (a
preemption signal, trainer.max_minutes) after writing its checkpoint exits 3: resumable, neither
success (0) nor failure (1) nor user error (2).

We compose with Hydra's compose API instead of `@hydra.main`: it gives the same config tree and
override grammar, but leaves the working directory and logging alone and lets us own the errors.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from persimmon_train.errors import EXIT_USER_ERROR, PersimmonTrainError, StoppedEarly

EXIT_STOPPED_EARLY = StoppedEarly.exit_code  # 3: stopped on request after a checkpoint; resumable
CONFIG_DIR_ENV = "PERSIMMON_TRAIN_CONFIG_DIR"


def config_dir() -> Path:
    """The shipped config tree: inside the package, so a plain (non-editable) wheel has it too."""
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).resolve()
    return Path(__file__).resolve().parent / "conf"


def prog(job: str) -> str:
    """How the user started `job`, for usage lines: the console script or a top-level recipe file."""
    started_as = Path(sys.argv[0]).resolve()
    console = started_as.name.startswith("persimmon-train")
    module = started_as.parent == Path(__file__).resolve().parent / "recipes"  # python -m persimmon_train.recipes
    if console or module:
        return f"persimmon-train {job.replace('_', '-')}"
    return f"python recipes/{job}.py"


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
    if not OmegaConf.has_resolver("demo_eval_files"):

        def demo_eval_files(train_files):
            # The demo's eval files belong to the demo's train files: a user who brings their own
            # data.train_files gets no demo eval data mixed in (set data.eval_files or eval_fraction).
            from persimmon_train.data import demo_assets

            assets = demo_assets()
            train = [str(f) for f in (train_files or [])]
            for demo_train, demo_eval in (
                (assets.train_files, assets.eval_files),
                (assets.preference_train_files, assets.preference_eval_files),
            ):
                if train == [str(v) for v in demo_train]:
                    return [str(v) for v in demo_eval]
            return []

        OmegaConf.register_new_resolver("demo_eval_files", demo_eval_files)


def compose_config(job: str, overrides: list[str], config_path: str | None = None, config_name: str | None = None):
    """Hydra-compose `conf/<job>.yaml` with `overrides`; returns the (unresolved) DictConfig.

    `config_path` (a folder) / `config_name`: a user's own configs, e.g. made with
    `persimmon-train cp finetune my.yaml`. The folder comes first on Hydra's search path and the
    shipped tree after it, so a copied primary config still finds its groups (model: tiny, ...),
    a group file in the folder (experiment/mine.yaml) is found, and one named like a shipped
    option shadows it. (`hydra.searchpath` would put the folder last and cannot hold the primary.)
    """
    from hydra import compose, version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    from persimmon_train.errors import ConfigError
    from persimmon_train.training.config import register_schema

    register_schema()
    _register_resolvers()
    primary = config_dir()
    if config_path is not None:
        primary = Path(config_path).expanduser().resolve()
        if not primary.is_dir():
            raise ConfigError(f"--config-path: {config_path!r} is not a folder")
    name = config_name or job
    if name.endswith((".yaml", ".yml")):
        name = name.rsplit(".", 1)[0]
    version.setbase("1.3")
    search_path = create_config_search_path(str(primary))
    if config_path is not None:
        search_path.append(
            provider="persimmon-train", path=f"file://{config_dir()}", anchor=SearchPathQuery(provider="main")
        )  # right after the user's folder
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2(task_name=job, config_search_path=search_path)
    try:
        return compose(config_name=name, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def load_config(job: str, overrides: list[str], config_path: str | None = None, config_name: str | None = None):
    """Compose, resolve and validate: returns a `RunConfig` dataclass."""
    from omegaconf import OmegaConf

    from persimmon_train.training.config import validate_run_config

    _reject_hydra_keys(overrides)
    cfg = compose_config(job, overrides, config_path, config_name)
    _reject_unknown_keys(cfg)
    run_config = validate_run_config(OmegaConf.to_object(cfg))
    _reject_unused_peft_keys(run_config, overrides)
    return run_config


def override_key(override: str) -> str:
    """The key of one command-line override: `+trainer.foo=1` -> `trainer.foo`, `peft=lora` -> `peft`."""
    return override.split("=", 1)[0].lstrip("+~")


# Hydra's own settings that `hydra.main` would act on; the compose API stores them and acts on none.
_HYDRA_DIR_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")


def _reject_hydra_keys(overrides: list[str]) -> None:
    """`hydra.run.dir=...`, `hydra.job.chdir=...`: accepted by compose, then silently ignored."""
    from persimmon_train.errors import ConfigError

    for key in map(override_key, overrides):
        if key in _HYDRA_DIR_KEYS:
            raise ConfigError(f"config key '{key}': not used; a run writes to output_dir=DIR (set that instead)")
        if key == "hydra" or key.startswith("hydra."):
            raise ConfigError(
                f"config key '{key}': Hydra's job settings are not used (the working directory and "
                f"logging stay as they are; a run writes to output_dir=DIR)"
            )


def _reject_unused_peft_keys(cfg, overrides: list[str]) -> None:
    """`peft=none peft.r=8`: a LoRA setting given on the command line while LoRA is off.

    Only the command line counts: group defaults and configs (conf/peft/none.yaml, an experiment)
    may carry LoRA settings that a later `peft=lora` uses.
    """
    from persimmon_train.errors import ConfigError

    if cfg.peft.method != "none":
        return
    for key in map(override_key, overrides):
        if key.startswith("peft.") and key != "peft.method":
            raise ConfigError(
                f"config key '{key}': set, but peft.method is none (LoRA is off); add peft=lora or drop {key}"
            )


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
        raise ConfigError(f"config key '{unknown[0]}': not a known key (see --print-config)")


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


@dataclass
class Invocation:
    """A recipe command line split into Hydra overrides and the Hydra-style flags we honour."""

    overrides: list[str] = field(default_factory=list)
    config_path: str | None = None  # --config-path / -cp: a folder holding the user's primary config
    config_name: str | None = None  # --config-name / -cn: its name (default: the job's)
    multirun: bool = False  # -m / --multirun: expand sweeps (optim.lr=1e-4,3e-4) into one job each
    print_only: bool = False  # --cfg / --print-config: print the resolved config, run nothing
    help: bool = False


_VALUE_FLAGS = {
    "--config-path": "config_path",
    "-cp": "config_path",
    "--config-name": "config_name",
    "-cn": "config_name",
}


def parse_invocation(args: list[str]) -> Invocation:
    from persimmon_train.errors import ConfigError

    inv, i = Invocation(), 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in _VALUE_FLAGS:
            if not eq:
                if i + 1 >= len(args):
                    raise ConfigError(f"{flag}: needs a value")
                i, value = i + 1, args[i + 1]
            setattr(inv, _VALUE_FLAGS[flag], value)
        elif arg in ("-m", "--multirun"):
            inv.multirun = True
        elif arg in ("--cfg", "--print-config"):
            inv.print_only = True
            if i + 1 < len(args) and args[i + 1] in ("job", "all", "hydra"):  # Hydra spells it `--cfg job`
                i += 1
        elif arg in ("-h", "--help"):
            inv.help = True
        else:
            inv.overrides.append(arg)
        i += 1
    return inv


def run_recipe(job: str, main: Callable, argv: list[str] | None = None, multirun: Callable | None = None) -> None:
    """Parse overrides for `job`, run `main(cfg)`, and turn user errors into one line + exit 2.

    With -m / --multirun every sweep override (`optim.lr=1e-4,3e-4`) expands into one job per
    combination: `multirun(job, main, invocation)` runs them (the recipes pass
    persimmon_train.recipes.sweep.run_sweep; this layer does not import the one above it).
    """
    args = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    started = False  # until main(cfg) runs, an error comes from the command line / config alone
    try:
        inv = parse_invocation(args)
        if inv.help:
            print(
                f"usage: {prog(job)} [key=value ...] [-m] [--config-path DIR --config-name NAME] "
                f"[--print-config]\nconfig tree: {config_dir()} (see docs/training.md)"
            )
            return
        if inv.multirun and not inv.print_only:
            if multirun is None:
                from persimmon_train.errors import ConfigError

                raise ConfigError(f"-m (multirun): not supported by {prog(job)}")
            started = True  # the sweep checks its jobs' configs itself (and refuses a launcher)
            multirun(job, main, inv)
            return
        cfg = load_config(job, inv.overrides, inv.config_path, inv.config_name)
        if inv.print_only:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            return
        started = True
        main(cfg)
    except StoppedEarly as exc:
        import signal

        # The process only exits now: a launcher passing on SIGTERM/SIGUSR1 to the ranks still
        # running when the first one exits (torchrun does) must not turn exit 3 into a kill.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if int(os.environ.get("RANK", "0") or 0) == 0:
            line = f"{_one_line(exc)} (exit {EXIT_STOPPED_EARLY}: resume=auto continues)"
            print(line, file=sys.stderr)
        sys.exit(EXIT_STOPPED_EARLY)
    except PersimmonTrainError as exc:
        exit_user_error(_one_line(exc), every_rank_sees_it=started is False)
    except Exception as exc:
        if _is_config_error(exc):
            exit_user_error(format_config_error(exc), every_rank_sees_it=started is False)
        raise


def exit_user_error(message: str, every_rank_sees_it: bool) -> None:
    """Print `error: message` once per launch, tell torchrun why, exit 2.

    Under a launcher every rank runs the same command line and usually fails the same way. Rank 0
    prints; another rank stays silent when its error is one every rank hits identically (the
    command line and config, checked before the recipe starts) or when torchrun will report it
    (torchrun gives each rank TORCHELASTIC_ERROR_FILE; the line written there is what its
    "Root Cause" report shows instead of a Python traceback).
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        import json
        import time

        line = f"error: {message}"
        record = {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}
        try:
            with open(error_file, "w", encoding="utf-8") as f:
                json.dump({"message": record}, f)
        except OSError:
            pass  # the report loses its cause; the exit code still says it
    rank = int(os.environ.get("RANK", "0") or 0)
    # torchrun restarts a failed group whatever the cause (launch/torchrun.sh: MAX_RESTARTS): the
    # first attempt's line is the one shown; the restarts fail the same way and stay silent.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if (rank == 0 or not (every_rank_sees_it or error_file)) and not restarted:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
