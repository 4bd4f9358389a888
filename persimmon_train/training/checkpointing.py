"""Training checkpoints: `output_dir/checkpoints/step_<N>/`, complete or absent.

A checkpoint is written into `step_<N>.tmp/` and renamed to `step_<N>/` only once every file is
in place, so a run killed mid-write never leaves a half checkpoint that `resume=latest` would pick.
Contents: the strategy's model (trainable weights, safetensors) + optimizer files, and
`trainer_state.pt` (scheduler, step counters, loader state, RNG states, tracker run id) holding
only tensors and plain Python values, so it loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch

from persimmon_train.errors import ConfigError

log = logging.getLogger("persimmon_train")

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state{suffix}.pt"
STRATEGY_INFO = "strategy.json"


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, TRAINER_STATE.format(suffix=""))):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """`resume=latest` -> newest complete checkpoint (None: start fresh); a path must be a checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, TRAINER_STATE.format(suffix=""))):
        raise ConfigError(f"resume: {resume!r} is not a training checkpoint folder "
                          f"(expected {TRAINER_STATE.format(suffix='')} inside)")
    return resume


# ---------------------------------------------------------------------------- RNG


def capture_rng() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value):
    """Make a loader/scheduler state safe for weights_only loading (numpy -> tensors / Python)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------- save / load


def save_checkpoint(output_dir: str, step: int, *, strategy, trainer_state: dict, keep_last: int,
                    info: dict | None = None) -> str:
    """Write step_<step>/ atomically (collective: every rank calls it) and prune old ones.

    `strategy.json` names the strategy that wrote the weights (and its world size, peft config),
    so readers pick `persimmon_train.parallel.<name>.iter_checkpoint_weights`.
    """
    root = checkpoints_root(output_dir)
    final = os.path.join(root, f"step_{step}")
    tmp = final + ".tmp"
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    strategy.barrier()
    strategy.save_state(tmp)
    suffix = "" if strategy.rank == 0 else f"_rank{strategy.rank}"
    torch.save(_plain(trainer_state), os.path.join(tmp, TRAINER_STATE.format(suffix=suffix)))
    if strategy.is_main:
        with open(os.path.join(tmp, STRATEGY_INFO), "w", encoding="utf-8") as f:
            json.dump({**strategy.checkpoint_info(), **(info or {})}, f, indent=2)
    strategy.barrier()
    if strategy.is_main:
        shutil.rmtree(final, ignore_errors=True)  # a re-run step after resume replaces it
        os.replace(tmp, final)
        if keep_last > 0:
            for _, old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    strategy.barrier()
    return final


def load_checkpoint(path: str, *, strategy) -> dict:
    """Restore model + optimizer into the strategy; return the trainer state dict."""
    strategy.load_state(path)
    suffix = "" if strategy.rank == 0 else f"_rank{strategy.rank}"
    own = os.path.join(path, TRAINER_STATE.format(suffix=suffix))
    if not os.path.isfile(own):  # resumed on more ranks than wrote it: counters/loader are rank 0's
        own = os.path.join(path, TRAINER_STATE.format(suffix=""))
    return torch.load(own, map_location="cpu", weights_only=True)


def adapt_loader_state(saved: dict, loader) -> dict:
    """Let a run resume at another world size / micro-batch when the global batch is unchanged.

    Loader positions count global batches of world_size x micro_batch_size rows; a run with
    the same rows per optimizer step (e.g. 2 ranks x 4 rows -> 1 rank x 8 rows, or 1 rank x 4 rows
    x 2 accumulation steps) continues with exactly the rows the uninterrupted run would see.
    """
    mine = loader.state_dict() if hasattr(loader, "state_dict") else {}
    keys = ("world_size", "micro_batch_size", "num_rows", "batch")
    if not all(k in saved and k in mine for k in keys):
        return saved
    if (saved["world_size"], saved["micro_batch_size"]) == (mine["world_size"], mine["micro_batch_size"]):
        return saved
    old = saved["world_size"] * saved["micro_batch_size"]
    new = mine["world_size"] * mine["micro_batch_size"]
    rows = saved["batch"] * old
    epoch_rows_old, epoch_rows_new = saved["num_rows"] // old * old, saved["num_rows"] // new * new
    if rows % new or epoch_rows_old != epoch_rows_new:
        from persimmon_train.errors import DataError

        raise DataError(f"cannot resume the data loader at world_size={mine['world_size']} x "
                        f"micro_batch_size={mine['micro_batch_size']}: the checkpoint's position ({rows} rows "
                        f"into epoch {saved['epoch']}, global batch {old}) does not fall on a global batch of "
                        f"{new}; keep world_size x micro_batch_size x grad_accum_steps constant")
    log.info("loader: resuming a world_size=%s x micro_batch_size=%s position at world_size=%s x "
             "micro_batch_size=%s", saved["world_size"], saved["micro_batch_size"], mine["world_size"],
             mine["micro_batch_size"])
    return {**saved, "batch": rows // new, "world_size": mine["world_size"], "micro_batch_size": mine["micro_batch_size"]}


def remove_stale_temporaries(output_dir: str) -> None:
    root = checkpoints_root(output_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
