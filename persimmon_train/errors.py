"""User-facing errors.

Everything a user can cause (bad config, bad data, bad weights) raises a subclass of
``PersimmonTrainError`` whose message names the file, row, key or tensor at fault. Recipes catch
this one base class and print the message on one line, with no traceback; anything else is a bug
and keeps its traceback.
"""

EXIT_USER_ERROR = 2  # every command's exit status for a user's mistake (one `error:` line, no traceback)


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of `exc`'s message (its type's name when the message is empty), for one-line reports."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:limit] if limit else line


class PersimmonTrainError(Exception):
    """Base class for errors caused by user input, reported without a traceback."""


class ConfigError(PersimmonTrainError, ValueError):
    """A configuration key has a bad value (the message names the key)."""


class WeightsError(PersimmonTrainError):
    """A weights folder or file is missing, corrupt, or does not match the model."""


class DataError(PersimmonTrainError, ValueError):
    """A data file, row or field is unusable (the message names the file, row and field)."""


class StorageError(PersimmonTrainError):
    """The disk refused a write or read (full, read-only, a file where a folder should be): names the path."""


class CheckpointError(WeightsError):
    """A training checkpoint is incomplete, damaged or does not fit this run (names the file or key)."""


class StoppedEarly(Exception):
    """The run stopped before trainer.max_steps on request (a signal, trainer.max_minutes) after
    writing a checkpoint: not a failure, and resumable (resume=auto). Exit code 3."""

    exit_code = 3
