"""`key=value` command lines for the recipes with nothing to compose (export, generate, convert_adept).

User errors print one line `error: ...` and exit 2, like every other recipe.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable

from persimmon_train.errors import EXIT_USER_ERROR, ConfigError, PersimmonTrainError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_key_values(argv: list[str], required: tuple[str, ...], optional: dict[str, str], usage: str) -> dict:
    values = dict(optional)
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep or key not in (*required, *optional):
            raise ConfigError(f"unknown argument {arg!r}; {usage}")
        values[key] = value
    missing = [key for key in required if not values.get(key)]
    if missing:
        raise ConfigError(f"missing {', '.join(k + '=...' for k in missing)}; {usage}")
    return values


def as_bool(values: dict, key: str) -> bool:
    value = str(values[key]).lower()
    if value not in _TRUE + _FALSE:
        raise ConfigError(f"{key}={values[key]!r} is not true or false")
    return value in _TRUE


def as_number(values: dict, key: str, kind: type, low: float | None = None, high: float | None = None):
    try:
        number = kind(values[key])
    except ValueError:
        raise ConfigError(f"{key}={values[key]!r} is not a{'n integer' if kind is int else ' number'}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{key}={values[key]!r} must be {bounds}")
    return number


def run_main(main: Callable[[list[str]], None], usage: str, argv: list[str] | None = None) -> None:
    """Run `main(argv)`; `-h` prints the usage; user errors -> one line on stderr, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        main(argv)
    except PersimmonTrainError as error:
        print("error: " + re.sub(r"\s+", " ", str(error)).strip(), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
