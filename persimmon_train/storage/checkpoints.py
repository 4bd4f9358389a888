"""Training checkpoints on disk: layout, manifest, listing, validation, and what to resume.

    output_dir/checkpoints/step_<N>/
        model.safetensors + optimizer.pt      strategy=single
        dcp/                                   strategy=fsdp (torch.distributed.checkpoint)
        deepspeed/                             strategy=deepspeed (engine.save_checkpoint)
        trainer_state.pt, trainer_state_rank<r>.pt   counters, scheduler, loader, RNG (tensors only)
        tokenizer/                             the run's tokenizer, so export needs no other file
        manifest.json                          written LAST: every file with size and CRC32, plus
                                               what rebuilding the model needs (architecture, head,
                                               labels, peft settings, strategy, base weights)

A checkpoint counts only when its manifest is there and every file it lists has the listed size
and checksum: a run killed mid-write, a truncated copy or a bit flip is caught before anything is
loaded. `resume=latest` takes the newest checkpoint that validates (and logs the damaged ones it
skipped); `resume=PATH` on a damaged checkpoint is an error naming the file. Export and resume
read settings from the manifest only, never from files a later command may rewrite.

Collectives come from a duck-typed `comm` (the strategy: is_main, rank, world_size, barrier,
all_gather_object), so this layer knows no strategy; each rank checksums a share of the files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from collections.abc import Callable

import torch

from persimmon_train.errors import CheckpointError, ConfigError, PersimmonTrainError, StorageError, first_line
from persimmon_train.storage.files import (
    atomic_write_text,
    describe_os_error,
    describe_torch_write_error,
    disk_errors,
)

log = logging.getLogger("persimmon_train")

# Layout shared by the writers (parallel/*.save_state) and the readers (storage.checkpoint_weights).
SINGLE_MODEL_FILE = "model.safetensors"
SINGLE_OPTIMIZER_FILE = "optimizer.pt"
DCP_DIR = "dcp"
DCP_MODEL_KEY, DCP_OPTIM_KEY = "model", "optim"
DEEPSPEED_TAG = "deepspeed"
TOKENIZER_DIR = "tokenizer"
MANIFEST = "manifest.json"
FORMAT = "persimmon-train-checkpoint"
VERSION = 1

STEP_DIR = re.compile(r"^step_(\d+)$")
_CHUNK = 16 << 20


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(checkpoints_root(output_dir), f"step_{step}")


def list_step_dirs(output_dir: str) -> list[tuple[int, str]]:
    """Every `step_N` folder (complete or not), oldest first."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = [
        (int(m.group(1)), os.path.join(root, name))
        for name in os.listdir(root)
        if (m := STEP_DIR.match(name)) and os.path.isdir(os.path.join(root, name))
    ]
    return sorted(found)


def trainer_state_file(rank: int) -> str:
    return "trainer_state.pt" if rank == 0 else f"trainer_state_rank{rank}.pt"


# ----------------------------------------------------------------------------- checksums


def file_crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _relative_files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            out.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(out)


def _my_share(items: list[str], comm) -> list[str]:
    rank, world = (comm.rank, comm.world_size) if comm is not None else (0, 1)
    return [item for i, item in enumerate(items) if i % world == rank]


def _gather(comm, value) -> list:
    return comm.all_gather_object(value) if comm is not None else [value]


# ----------------------------------------------------------------------------- writing


class LocalComm:
    """The `comm` of a single process (tools and tests that write a checkpoint without a strategy)."""

    is_main, rank, world_size = True, 0, 1

    def barrier(self) -> None:
        pass

    def all_gather_object(self, obj) -> list:
        return [obj]

    def broadcast_object(self, obj):
        return obj


def save_checkpoint(
    output_dir: str, step: int, *, comm, write_files: Callable[[str], None], metadata: dict, keep_last: int = 0
) -> str:
    """Write `step_<step>/` (collective: every rank calls it) and prune old checkpoints.

    `write_files(folder)` runs on every rank and writes that rank's files (weights, optimizer,
    trainer state). Then each rank checksums its share of the files, rank 0 writes the manifest
    last and renames `step_<step>.tmp` into place. Any rank's failure (a full disk, say) is raised
    on every rank as one StorageError naming the path; the partial folder is removed and every
    earlier checkpoint stays as it was.
    """
    final = step_dir(output_dir, step)
    tmp = final + ".tmp"
    if comm.is_main:
        with disk_errors(tmp):
            shutil.rmtree(tmp, ignore_errors=True)  # our own leftover of a killed run
            os.makedirs(tmp)
    comm.barrier()

    def agree(action: Callable[[], object]):
        """Run `action` on this rank; if it failed on any rank, clean up and raise there too."""
        result, error, bug = None, None, None
        try:
            result = action()
        except (OSError, PersimmonTrainError, RuntimeError) as exc:
            error = _one_line(exc, tmp)
        except Exception as exc:  # a bug: the other ranks must not wait for us in the gather below
            error, bug = _one_line(exc, tmp), exc
        errors = [e for e in _gather(comm, error) if e]
        if errors:
            if comm.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if bug is not None:
                raise bug  # keeps its traceback on the rank where it happened
            raise StorageError(f"checkpoint step_{step} not written: {errors[0]}; earlier checkpoints are intact")
        return result

    agree(lambda: write_files(tmp))
    files = comm.broadcast_object(_relative_files(tmp) if comm.is_main else None)
    sums = agree(
        lambda: {
            name: {"size": os.path.getsize(os.path.join(tmp, name)), "crc32": file_crc32(os.path.join(tmp, name))}
            for name in _my_share(files, comm)
        }
    )
    gathered = _gather(comm, sums)

    def commit() -> None:
        if not comm.is_main:
            return
        listing = {name: entry for share in gathered for name, entry in share.items()}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            **metadata,
            "files": dict(sorted(listing.items())),
        }
        atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=2) + "\n")
        with disk_errors(final):
            if os.path.isdir(final):
                shutil.rmtree(final)  # our own checkpoint of this step, re-run after a resume
            os.replace(tmp, final)

    agree(commit)
    if comm.is_main and keep_last > 0:
        for _, old in list_step_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return final


def _one_line(exc: BaseException, where: str) -> str:
    if isinstance(exc, OSError):
        return f"writing {exc.filename or where}: {describe_os_error(exc)} [errno {exc.errno}]"
    if (short_write := describe_torch_write_error(exc, where)) is not None:
        return f"writing {short_write}"  # a torch.save outside disk_errors (strategies' own writers)
    return first_line(exc)


def remove_stale_temporaries(output_dir: str) -> None:
    """`step_N.tmp/` folders left by a killed run (ours by name; never a user's file)."""
    root = checkpoints_root(output_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.endswith(".tmp") and STEP_DIR.match(name[:-4]):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save_trainer_state(folder: str, rank: int, state: dict) -> None:
    """Counters, scheduler, loader and RNG state: tensors and plain values only (weights_only loads)."""
    path = os.path.join(folder, trainer_state_file(rank))
    with disk_errors(path):
        torch.save(state, path)


# ----------------------------------------------------------------------------- reading


def read_manifest(path: str) -> dict:
    """The checkpoint's manifest; CheckpointError (naming the file) if it is missing or unreadable."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(
            f"{manifest_path} is missing: the checkpoint is incomplete (its write was "
            f"interrupted) or was not written by persimmon-train"
        )
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is unreadable ({exc})") from None
    valid = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    if not valid or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path} is not a persimmon-train checkpoint manifest")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{manifest_path}: version {manifest['version']} is newer than this "
            f"persimmon-train understands ({VERSION}); upgrade"
        )
    return manifest


def _check_file(folder: str, name: str, entry: dict, checksums: bool) -> str | None:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != entry.get("size"):
        return f"{path} has {size} bytes, the manifest says {entry.get('size')} (truncated or replaced)"
    if checksums and file_crc32(path) != entry.get("crc32"):
        return f"{path} does not match its checksum (the file is damaged)"
    return None


def validate_checkpoint(path: str, comm=None, checksums: bool = True) -> dict:
    """The manifest of a complete, undamaged checkpoint; CheckpointError naming the first bad file.

    With `comm`, each rank checksums its share of the files (collective: all ranks call it).
    """
    try:
        manifest = read_manifest(path)
        error = None
    except CheckpointError as exc:
        manifest, error = None, str(exc)
    errors = [e for e in _gather(comm, error) if e]
    if errors:
        raise CheckpointError(errors[0])
    files = sorted(manifest["files"])
    problems = [
        p for name in _my_share(files, comm) if (p := _check_file(path, name, manifest["files"][name], checksums))
    ]
    problems = [p for share in _gather(comm, problems) for p in share]
    if problems:
        raise CheckpointError(problems[0])
    return manifest


def _newest_valid(output_dir: str, comm, why: str) -> tuple[tuple[str, dict] | None, list[str]]:
    """(the newest `step_N` that validates, or None; "step_N: why" for each damaged one skipped)."""
    damaged = []
    for step, path in reversed(list_step_dirs(output_dir)):
        try:
            return (path, validate_checkpoint(path, comm)), damaged
        except CheckpointError as exc:
            log.warning("%s: skipping damaged checkpoint step_%d (%s)", why, step, exc)
            damaged.append(f"step_{step}: {exc}")
    return None, damaged


def choose_resume(resume: str | None, output_dir: str, comm=None) -> tuple[str, dict] | None:
    """(checkpoint path, manifest) to resume from, or None to start fresh.

    `latest` (and `auto`, what the launch scripts pass so a restarted job continues): the newest
    `step_N` of output_dir that validates; damaged ones are skipped with a warning saying why; no
    `step_N` at all: None (start fresh). Every one damaged: CheckpointError naming each and why, and
    nothing on disk is touched (starting fresh would write over them).
    A path: that checkpoint, which must validate (else CheckpointError).
    """
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        chosen, damaged = _newest_valid(output_dir, comm, f"resume={resume}")
        if chosen is None and damaged:
            raise CheckpointError(
                f"resume={resume}: no checkpoint in {checkpoints_root(output_dir)} is complete and undamaged "
                f"({'; '.join(damaged)}); they are left as they are. Resume one that validates with "
                f"resume=PATH, or start over on purpose with overwrite=true (and no resume)"
            )
        return chosen
    path = os.path.abspath(resume)
    if not os.path.exists(path):
        raise ConfigError(f"resume: {path} does not exist")
    return path, validate_checkpoint(path, comm)


def load_trainer_state(folder: str, rank: int) -> dict:
    """This rank's trainer state (rank 0's when the checkpoint was written by fewer ranks)."""
    path = os.path.join(folder, trainer_state_file(rank))
    if not os.path.isfile(path):
        path = os.path.join(folder, trainer_state_file(0))
    try:
        # weights_only: never unpickle arbitrary objects from a checkpoint folder.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a damaged file
        raise CheckpointError(f"{path}: cannot read the trainer state ({first_line(exc, 200)})") from None


def find_checkpoint(path: str) -> tuple[str, dict | None]:
    """`checkpoints/step_N`, or a run's output_dir (its newest checkpoint that validates).

    Returns (path, manifest): the manifest when choosing among a run's checkpoints validated it
    already, else None (the caller validates, after its own cheaper checks).
    """
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint: {path} does not exist")
    if os.path.isfile(os.path.join(path, MANIFEST)) or STEP_DIR.match(os.path.basename(path)):
        return path, None
    chosen, damaged = _newest_valid(path, None, "checkpoint")
    if damaged and chosen is None:
        raise CheckpointError(f"checkpoint: every checkpoint of {path} is damaged ({'; '.join(damaged)})")
    if chosen is None:
        raise ConfigError(
            f"checkpoint: {path} is neither a training checkpoint (checkpoints/step_N with "
            f"{MANIFEST}) nor a run folder with a complete checkpoint"
        )
    return chosen
