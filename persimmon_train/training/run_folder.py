"""What a training run owns in its output_dir, and who may write there.

- A folder that already holds a run (`checkpoints/step_N`, metrics.jsonl, config.yaml, ...) is
  continued (`resume=latest` / `resume=PATH`), started over on purpose (`overwrite=true`), or
  refused before any compute: a rerun of the same command never replaces a finished run.
- `overwrite=true` removes only the earlier run's own files (`RUN_FILES`, the `step_N` checkpoint
  folders, and in final/ and adapter/ the files an export writes); anything else in the folder
  (a user's notes, W&B's folder, eval_metrics.json, ...) stays.
- One run at a time: rank 0 holds `flock` on `output_dir/.persimmon-train.lock` for the life of
  the run (the file names its pid and host); the kernel releases it when the process ends, even by
  SIGKILL. Only rank 0 locks, so a folder on a file system shared by several nodes is locked once.

Every decision is made on rank 0 and broadcast (`agree`), so all ranks stop together.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable

from persimmon_train.errors import ConfigError, PersimmonTrainError
from persimmon_train.storage import checkpoints as store
from persimmon_train.storage.files import disk_errors
from persimmon_train.storage.hf_folder import is_own_file

log = logging.getLogger("persimmon_train")

RUN_FILES = ("metrics.jsonl", "config.yaml", "train.log", "loss_curve.png")
EXPORT_DIRS = ("final", "adapter")  # written at the end of a run by export.exporter.export_run_outputs
LOCK_FILE = ".persimmon-train.lock"


def agree(strategy, check: Callable[[], object]):
    """`check()` on rank 0; its result, or the user error it raised, on every rank."""
    outcome, bug = None, None
    if strategy.is_main:
        try:
            outcome = ("ok", check())
        except PersimmonTrainError as exc:
            outcome = ("error", exc)
        except Exception as exc:  # a bug: the other ranks must not wait for us in the broadcast
            outcome, bug = ("bug", f"{type(exc).__name__} on rank 0"), exc
    kind, value = strategy.broadcast_object(outcome)
    if bug is not None:
        raise bug  # keeps its traceback on rank 0
    if kind == "error":
        raise value
    if kind == "bug":
        raise RuntimeError(f"output_dir check failed: {value}")
    return value


# ----------------------------------------------------------------------------- an earlier run


def _export_files(output_dir: str, name: str) -> list[str]:
    folder = os.path.join(output_dir, name)
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if is_own_file(f) and os.path.isfile(os.path.join(folder, f)))


def earlier_run(output_dir: str) -> tuple[list[str], list[str]]:
    """What `output_dir` holds of an earlier run: (its checkpoints `step_N`, in step order; its other files)."""
    checkpoints = [os.path.basename(path) for _, path in store.list_step_dirs(output_dir)]
    files = [name for name in RUN_FILES if os.path.isfile(os.path.join(output_dir, name))]
    files += [f"{name}/" for name in EXPORT_DIRS if _export_files(output_dir, name)]
    return checkpoints, files


def _names(items: list[str], most: int = 8) -> str:
    if len(items) <= most:
        return ", ".join(items)
    return f"{', '.join(items[:2])}, ... ({len(items)} in all), {', '.join(items[-3:])}"


def check_start(cfg, output_dir: str) -> None:
    """Before any compute (writes nothing): the folder is not in use by a live run, and holds no
    earlier run unless this one resumes it or starts over (`overwrite=true`)."""
    holder = lock_holder(output_dir)
    if holder is not None:
        raise ConfigError(in_use(output_dir, holder))
    if cfg.resume is not None or cfg.overwrite:
        return
    checkpoints, files = earlier_run(output_dir)
    if checkpoints or files:
        found = f"checkpoints {_names(checkpoints)}" if checkpoints else "no checkpoints"
        if files:
            found += f"; {', '.join(files)}"
        raise ConfigError(
            f"output_dir: {output_dir} already holds a run ({found}); resume=latest continues it, "
            f"overwrite=true starts over (replacing only that run's own files), or choose another output_dir"
        )


def start_over(output_dir: str) -> list[str]:
    """overwrite=true: remove the earlier run's own files (rank 0, under the lock); returns what went.

    Its `step_N` (and `step_N.tmp`) checkpoint folders, RUN_FILES, and in final/ and adapter/ the
    files an export writes (each folder removed only if that leaves it empty). Nothing else.
    """
    removed = []
    root = store.checkpoints_root(output_dir)
    with disk_errors(output_dir, "starting over in"):
        for _, path in store.list_step_dirs(output_dir):
            shutil.rmtree(path)
            removed.append(os.path.relpath(path, output_dir))
        store.remove_stale_temporaries(output_dir)
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
        for name in RUN_FILES:
            path = os.path.join(output_dir, name)
            if os.path.isfile(path):
                os.remove(path)
                removed.append(name)
        for name in EXPORT_DIRS:
            folder = os.path.join(output_dir, name)
            for file in _export_files(output_dir, name):
                os.remove(os.path.join(folder, file))
                removed.append(f"{name}/{file}")
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
    return removed


# ----------------------------------------------------------------------------- the lock


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its pid and host yet"


def in_use(output_dir: str, holder: str) -> str:
    return (
        f"output_dir: {output_dir} is in use by another run ({holder}; lock file "
        f"{os.path.join(output_dir, LOCK_FILE)}); wait for it to end, or choose another output_dir"
    )


def lock_holder(output_dir: str) -> str | None:
    """Who holds output_dir's lock now (None: nobody). Creates and changes nothing."""
    path = os.path.join(output_dir, LOCK_FILE)
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return None  # unreadable: acquire() reports it, naming the path
    with handle:
        try:
            # Shared: it conflicts only with a holder's exclusive lock, and needs no write access.
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_holder(handle.read())
        except OSError:
            return None  # no flock on this file system: acquire() says so
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return None


class RunLock:
    """output_dir's lock while held; `release()` (idempotent) removes the lock file and unlocks."""

    def __init__(self, path: str | None = None, handle=None):
        self.path, self._handle = path, handle

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self._handle.fileno()).st_ino:
                os.remove(self.path)  # still locked: a run that opened it meanwhile sees it gone and retries
        self._handle.close()
        self._handle = None


def acquire(output_dir: str) -> RunLock:
    """Take output_dir's lock (the folder exists) or raise ConfigError naming the holder's pid and host."""
    path = os.path.join(output_dir, LOCK_FILE)
    while True:
        with disk_errors(path, "locking"):
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe_holder(handle.read())
            handle.close()
            raise ConfigError(in_use(output_dir, holder)) from None
        except OSError as exc:  # a file system without flock (e.g. Lustre mounted without -o flock)
            handle.close()
            log.warning(
                "output_dir: cannot lock %s (%s); this run goes on unlocked: start no other run into %s",
                path,
                exc.strerror or exc,
                output_dir,
            )
            return RunLock()
        try:
            current = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()  # the previous holder removed this file as we opened it: lock the new one
    with disk_errors(path, "locking"):
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}) + "\n")
        handle.flush()
    return RunLock(path, handle)


def lock_run(output_dir: str, strategy, *, overwrite: bool) -> RunLock:
    """Collective: rank 0 locks output_dir (it exists now) and, with `overwrite`, removes the earlier
    run's files; every rank gets the same refusal. Other ranks get a RunLock that holds nothing."""
    lock = RunLock()

    def take() -> None:
        nonlocal lock
        lock = acquire(output_dir)
        if overwrite:
            try:
                removed = start_over(output_dir)
            except BaseException:
                lock.release()
                raise
            if removed:
                log.info("overwrite=true: removed the earlier run's %s", _names(removed, most=12))

    agree(strategy, take)
    strategy.barrier()
    return lock
