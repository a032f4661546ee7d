"""The one error hierarchy of inkpipe.

Every error a user can cause is an :class:`InkpipeError`. Subclasses also inherit the matching
builtin so callers can catch either. The CLI turns an ``InkpipeError`` into a one-line message
and exit code 1, never a traceback; so a message must say what was given, what was expected,
and the fix, e.g. ``fragment 2: found 63 slices in fragments/2/surface_volume, expected 65``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from enum import StrEnum
from typing import TypeVar, overload

Choice = TypeVar("Choice", bound=StrEnum)


class InkpipeError(Exception):
    """Root of all errors caused by input, configuration or environment."""


class InputNotFoundError(InkpipeError, FileNotFoundError):
    """A file or folder that should exist does not."""


class InvalidInputError(InkpipeError, ValueError):
    """A file exists but its content is not what inkpipe expects."""


class UnsafeCheckpointError(InvalidInputError):
    """A checkpoint holds pickled objects that could run code; it is loaded only if trusted."""


class ConfigError(InkpipeError, ValueError):
    """An option or configuration value is invalid."""


class StoreError(InkpipeError, ValueError):
    """A Zarr store is missing, foreign, or not in the expected schema."""


class OfflineError(InkpipeError, RuntimeError):
    """Something needed the network (e.g. pretrained weights) and the machine is offline."""


class TrainingError(InkpipeError, RuntimeError):
    """Training cannot continue (e.g. a non-finite loss)."""


class MissingPackageError(InkpipeError, ImportError):
    """An option needs an optional package that is not installed (the message says how)."""


class DiskFullError(InkpipeError, OSError):
    """The disk has (or would have) no room for what inkpipe is about to write."""


class LockedError(InkpipeError, RuntimeError):
    """A store or run folder is being written by another inkpipe process."""


def closest(given: object, choices: Iterable[str]) -> str:
    """Return a ``"; did you mean 'x'?"`` hint for ``given`` among ``choices``, or ``""``."""
    matches = difflib.get_close_matches(str(given), list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{matches[0]}'?" if matches else ""


@overload
def check_choice(name: str, given: object, choices: type[Choice]) -> Choice: ...
@overload
def check_choice(name: str, given: object, choices: Iterable[str]) -> str: ...
def check_choice(name: str, given: object, choices: type[Choice] | Iterable[str]) -> Choice | str:
    """Return ``given`` if it is one of ``choices``, else raise :class:`ConfigError`.

    ``choices`` is a :class:`~enum.StrEnum` (then the member whose value is ``given`` is
    returned, so a plain string from a command line or a config file becomes the member) or
    strings. The message lists the valid choices and suggests the closest one:
    ``unknown loss 'focall'; did you mean 'focal'? (choose from bce, focal, dice)``.
    """
    options = [str(c) for c in choices]
    if isinstance(given, str) and given in options:
        if isinstance(choices, type) and issubclass(choices, StrEnum):
            return choices(given)
        return given
    raise ConfigError(
        f"unknown {name} '{given}'{closest(given, options)} (choose from {', '.join(options)})"
    )
