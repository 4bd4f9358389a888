"""Files and folders: atomic writes, staged output folders, and disk errors as one-line messages.

Rules every writer here follows:
- a file appears under its final name only once complete (written to a temporary name, fsynced,
  renamed);
- an output folder is built in a fresh sibling staging folder and moved into place at the end,
  so a failed write changes nothing at the destination;
- nothing is ever deleted that this project did not write: a non-empty destination is refused
  unless the caller allows overwriting, and even then only the files the new write produces (and
  stale weight shards of an earlier write) are replaced;
- running out of disk, a read-only folder or a file where a folder should be becomes a
  `StorageError` naming the path, not an OSError traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator

from persimmon_train.errors import ConfigError, StorageError, first_line

_DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file is larger than this system allows (file size limit)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EEXIST: "it already exists",
}


def describe_os_error(exc: OSError) -> str:
    return _DISK_ERRNOS.get(exc.errno, exc.strerror or str(exc))


# torch.save reports a short write (a full disk, an exhausted quota) as its own RuntimeError, not an
# OSError: "[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3988", or
# "PytorchStreamWriter failed writing file data/0: file write failed".
_TORCH_SHORT_WRITE = re.compile(r"inline_container\.cc|PytorchStreamWriter|unexpected pos \d+ vs \d+")
FULL_DISK_BYTES = 64 << 20  # less than this free after a failed write: the write filled the disk


def describe_torch_write_error(exc: BaseException, path: str) -> str | None:
    """One line for torch's short-write RuntimeError naming `path` (None: not such an error).

    The disk's free space decides the wording: (nearly) none left means the disk is full; with room
    left the cause is a quota or a file size limit, which statvfs cannot see.
    """
    if not isinstance(exc, RuntimeError) or not _TORCH_SHORT_WRITE.search(str(exc)):
        return None
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < FULL_DISK_BYTES:
        return f"{path}: the disk is full ({free >> 20} MiB free on its file system)"
    torch_said = first_line(exc, 200)
    room = f"{free / 2**30:.1f} GiB free there, " if free is not None else ""
    return (
        f"{path}: the write stopped short ({room}so a disk quota or file size limit is likely "
        f"exhausted; torch: {torch_said})"
    )


@contextlib.contextmanager
def disk_errors(path: str, what: str = "writing") -> Iterator[None]:
    """Turn an OSError from the file system (or torch.save's short-write RuntimeError) into a
    one-line StorageError naming `path`."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        where = exc.filename or path
        raise StorageError(f"{what} {where}: {describe_os_error(exc)} [errno {exc.errno}]") from None
    except RuntimeError as exc:
        described = describe_torch_write_error(exc, path)
        if described is None:
            raise
        raise StorageError(f"{what} {described}") from None


def fsync_file(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp_path)`, fsync, rename to `path`; on any error the temporary file is removed."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    with disk_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            write(tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def check_writable_folder(path: str, key: str) -> str:
    """`path` may become an output folder: not a file, and its nearest existing ancestor writable.

    Creates nothing (a failed command must leave the disk as it was). Returns the absolute path.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}: {path} is a file, not a folder")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"{key}: cannot create {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot write to {path}: {probe} is read-only or not ours")
    return path


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.listdir(path)


def check_output_folder(path: str, key: str, overwrite: bool) -> str:
    """An export destination: new, empty, or (overwrite=True) a folder whose files we may replace."""
    path = check_writable_folder(path, key)
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ConfigError(
            f"{key}: {path} exists and is not empty; choose a new folder or pass overwrite=true "
            f"(which replaces only the files the export writes)"
        )
    return path


@contextlib.contextmanager
def staged_folder(out_dir: str, *, replaceable: Callable[[str], bool] = lambda name: False) -> Iterator[str]:
    """Yield a fresh staging folder beside `out_dir`; on success its files move into `out_dir`.

    - `out_dir` absent (or empty): the staging folder is renamed to it, atomically.
    - `out_dir` with files: each staged file replaces its namesake; files in `out_dir` for which
      `replaceable(name)` is true and that the new write did not produce (stale weight shards)
      are removed; every other file is left alone.
    On any error the staging folder (ours alone: a unique name) is removed and `out_dir` is untouched.
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    with disk_errors(out_dir):
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.staging-", dir=parent)
    try:
        yield staging
        with disk_errors(out_dir):
            if _is_empty_dir(out_dir):
                os.rmdir(out_dir)
            if not os.path.exists(out_dir):
                os.replace(staging, out_dir)
                return
            produced = set(os.listdir(staging))
            for name in sorted(produced):
                target = os.path.join(out_dir, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    raise StorageError(f"writing {target}: a folder is in the way of the file to write there")
                os.replace(os.path.join(staging, name), target)
            for name in os.listdir(out_dir):
                target = os.path.join(out_dir, name)
                if name not in produced and replaceable(name) and os.path.isfile(target):
                    os.remove(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
