"""What one rank of a run will hold, from its config alone: `persimmon-train estimate [key=value ...]`.

    persimmon-train estimate [finetune|classify|tag] [--ranks N] [--device cpu|cuda] [--memory-gb G]
                             [key=value ...] [--config-path DIR --config-name NAME]

Takes the same overrides as the training command, reads the config (and `model.path/config.json`
when set: the architecture, never the weights) and prints the planner's breakdown per rank:
weights by dtype, gradients, optimizer state, activations of one micro-batch, the loss's logits
chunk, communication buffers, and the total against the device's memory (`--memory-gb`, else this
machine's: a GPU's total memory, or MemAvailable on CPU). `--ranks` is the world size the run
will have (default: $WORLD_SIZE, else 1); `--device` the accelerator kind (default: cuda when this
machine has one, else cpu). A released size (model=persimmon_8b) needs no model.path here.
Exit status 0 when the estimate fits, 1 when it does not. The arithmetic: training/memory_plan.py.
"""

from __future__ import annotations

import os
import sys

from persimmon_train.cli import prog, run_recipe
from persimmon_train.errors import ConfigError
from persimmon_train.recipes import TRAINING_JOBS

OPTIONS = ("--ranks", "--device", "--memory-gb")


def split_options(argv: list[str]) -> tuple[dict, list[str]]:
    """Take --ranks / --device / --memory-gb (as `--x V` or `--x=V`) out of argv; the rest are overrides."""
    options, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in OPTIONS:
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise ConfigError(f"estimate: {arg} needs a value")
            options[name[2:].replace("-", "_")] = value
        else:
            rest.append(arg)
        i += 1
    return options, rest


def estimate(cfg, options: dict) -> int:
    """Print the plan; return the exit status (0 fits, 1 does not)."""
    from persimmon_train.training.memory_plan import device_memory, plan_memory, run_model_config

    try:
        ranks = int(options.get("ranks") or os.environ.get("WORLD_SIZE", "1"))
        memory = float(options["memory_gb"]) * 1e9 if "memory_gb" in options else None
    except ValueError as exc:
        raise ConfigError(f"estimate: --ranks takes an integer and --memory-gb a number ({exc})") from None
    device = options.get("device")
    if device is None:
        requested = str(cfg.strategy.device)
        if requested.startswith("cuda"):
            device = "cuda"
        elif requested == "cpu":
            device = "cpu"
        else:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"estimate: --device {device!r} is not one of cpu, cuda")
    if memory is None:
        import torch

        memory = device_memory(device) if device == "cpu" or torch.cuda.is_available() else None
    plan = plan_memory(cfg, run_model_config(cfg), ranks, device, available=None if memory is None else int(memory))
    print(plan.table(), flush=True)
    if memory is None:
        print("  (no GPU here: pass --memory-gb G to compare with a card's memory)")
    return 0 if plan.fits else 1


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    job = "finetune"
    if argv and argv[0] in TRAINING_JOBS:
        job, argv = argv[0], argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip().replace("persimmon-train estimate [finetune", f"{prog('estimate')} [finetune", 1))
        return
    try:
        options, overrides = split_options(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    # Nothing is built: a released size needs no weights to be estimated.
    overrides = [*overrides, "model.allow_random_init=true"]
    status = {}
    run_recipe(job, lambda cfg: status.setdefault("rc", estimate(cfg, options)), overrides)
    if status.get("rc"):
        sys.exit(status["rc"])
