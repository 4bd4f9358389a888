"""Training checkpoints from the trainer's side: what goes into one, and getting it back.

The bytes on disk (layout, manifest with sizes and checksums, validation, what to resume) belong
to `persimmon_train.storage.checkpoints`; this module hands it the stateful pieces -- the
strategy's model + optimizer files, the trainer state (scheduler, step counters, loader position,
RNG states, tracker run id; tensors and plain values only, so it loads with weights_only=True),
the tokenizer -- and the manifest metadata export needs to rebuild the model without any other
file: architecture, exact model config (labels included), peft settings, base weights, strategy.
"""

from __future__ import annotations

import logging
import os
import random
import threading

import numpy as np
import torch

from persimmon_train.errors import CheckpointError, DataError
from persimmon_train.storage import checkpoints as store

log = logging.getLogger("persimmon_train")


# ---------------------------------------------------------------------------- RNG


def capture_rng() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
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


def manifest_metadata(cfg, strategy, model) -> dict:
    """What export and resume read back: never the run's config.yaml, which a later command rewrites."""
    from persimmon_train.adapters import peft_settings

    return {
        "task": cfg.task,
        "strategy": strategy.checkpoint_info(),
        "model": {
            "architecture": type(model).__name__,
            "config": model.config.to_dict(),
            "base": {"path": os.path.abspath(cfg.model.path) if cfg.model.path else None, "seed": cfg.trainer.seed},
        },
        "peft": peft_settings(cfg.peft) if cfg.peft.method == "lora" else None,
    }


def save_run_checkpoint(
    output_dir: str, step: int, *, strategy, trainer_state: dict, metadata: dict, tokenizer, keep_last: int
) -> str:
    """Write the run's step_<step>/ (collective: every rank calls it): the strategy's weights and
    optimizer, the trainer state and the tokenizer, through storage's one checkpoint writer
    (`storage.checkpoints.save_checkpoint`: checksums, manifest last, rename); old ones beyond
    keep_last are pruned."""

    def write_files(folder: str) -> None:
        strategy.save_state(folder)
        store.save_trainer_state(folder, strategy.rank, _plain(trainer_state))
        if strategy.is_main and tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(folder, store.TOKENIZER_DIR))

    return store.save_checkpoint(
        output_dir, step, comm=strategy, write_files=write_files, metadata=metadata, keep_last=keep_last
    )


class BackgroundSave:
    """One checkpoint written in a background thread (checkpoint.async_save, strategy=fsdp).

    The model and optimizer state are copied to host memory here, on the training thread; the
    thread then writes every file and runs `store.save_checkpoint`'s checksums, manifest and rename
    over a gloo group of its own, so the manifest appears only once every rank's files are complete:
    a process killed mid-write leaves no checkpoint that validates. `wait` joins it (and raises its
    error on every rank, as the synchronous save does).
    """

    def __init__(self, output_dir, step, *, strategy, trainer_state, metadata, tokenizer, keep_last):
        comm = strategy.checkpoint_comm()
        staged = strategy.stage_state()
        trainer_state = _plain(trainer_state)
        self.step, self.path, self.error = step, None, None

        def write_files(folder: str) -> None:
            strategy.save_staged(staged, folder, comm)
            store.save_trainer_state(folder, strategy.rank, trainer_state)
            if strategy.is_main and tokenizer is not None:
                tokenizer.save_pretrained(os.path.join(folder, store.TOKENIZER_DIR))

        def run() -> None:
            try:
                self.path = store.save_checkpoint(
                    output_dir, step, comm=comm, write_files=write_files, metadata=metadata, keep_last=keep_last
                )
            except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread by wait()
                self.error = exc

        # daemon: a process that dies with a save in flight leaves a step_N.tmp/ without manifest
        self.thread = threading.Thread(target=run, name=f"checkpoint-step_{step}", daemon=True)
        self.thread.start()

    def wait(self) -> str:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.path


def load_checkpoint(path: str, *, strategy) -> dict:
    """Restore model + optimizer into the strategy; return this rank's trainer state dict."""
    strategy.load_state(path)
    return store.load_trainer_state(path, strategy.rank)


_ARCHITECTURE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "partial_rotary_factor",
    "qk_layernorm",
    "num_labels",
)


def check_resumable(path: str, manifest: dict, cfg, model_config, model_class: type, strategy=None) -> None:
    """A checkpoint resumes only into the run that wrote it: same head, shapes and LoRA settings
    (and a DeepSpeed checkpoint into strategy=deepspeed, at any world size and ZeRO stage).

    Checked from the manifest before any tensor is read; the message names the key that differs.
    """
    from persimmon_train.adapters import peft_settings

    where = os.path.join(path, store.MANIFEST)
    written = manifest.get("strategy") or {}
    if strategy is not None and written.get("name") == "deepspeed" and strategy.name != "deepspeed":
        raise CheckpointError(
            f"resume: {where} was written by strategy=deepspeed; its ZeRO partitions resume only "
            f"with strategy=deepspeed (any number of ranks, any stage; this run: strategy={strategy.name}); "
            f"export it (recipes/export.py) and start from the export with model.path instead"
        )
    model = manifest.get("model") or {}
    if model.get("architecture") != model_class.__name__:
        raise CheckpointError(
            f"resume: {where} was written by a {model.get('architecture')} run, this run "
            f"trains a {model_class.__name__} (task={cfg.task})"
        )
    saved, mine = model.get("config") or {}, model_config.to_dict()
    for key in _ARCHITECTURE_KEYS:
        if saved.get(key) != mine.get(key):
            raise CheckpointError(
                f"resume: model.{key} is {mine.get(key)} but {where} was trained with {saved.get(key)}"
            )
    saved_peft = manifest.get("peft")
    mine_peft = peft_settings(cfg.peft) if cfg.peft.method == "lora" else None
    if (saved_peft is None) != (mine_peft is None):
        raise CheckpointError(
            f"resume: peft={cfg.peft.method} but {where} was trained with peft={'lora' if saved_peft else 'none'}"
        )
    if saved_peft:
        for key in ("r", "alpha", "use_rslora", "target_modules", "modules_to_save"):
            if saved_peft.get(key) != mine_peft.get(key):
                raise CheckpointError(
                    f"resume: peft.{key} is {mine_peft.get(key)} but {where} was trained with {saved_peft.get(key)}"
                )
        saved_quant = saved_peft.get("quantize_base") or "none"  # manifests before QLoRA: none
        if saved_quant != mine_peft["quantize_base"]:
            raise CheckpointError(
                f"resume: peft.quantize_base is {mine_peft['quantize_base']} but {where} was trained with {saved_quant}"
            )


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
        raise DataError(
            f"cannot resume the data loader at world_size={mine['world_size']} x "
            f"micro_batch_size={mine['micro_batch_size']}: the checkpoint's position ({rows} rows "
            f"into epoch {saved['epoch']}, global batch {old}) does not fall on a global batch of "
            f"{new}; keep world_size x micro_batch_size x grad_accum_steps constant"
        )
    log.info(
        "loader: resuming a world_size=%s x micro_batch_size=%s position at world_size=%s x micro_batch_size=%s",
        saved["world_size"],
        saved["micro_batch_size"],
        mine["world_size"],
        mine["micro_batch_size"],
    )
    return {
        **saved,
        "batch": rows // new,
        "world_size": mine["world_size"],
        "micro_batch_size": mine["micro_batch_size"],
    }
