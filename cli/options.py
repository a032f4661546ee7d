"""Option defaults read from the config dataclasses, so the command line never restates them.

Every option whose value ends up in a config field takes its default from that field:
``default=default_of(TrainConfig, "epochs")``. The defaults are read when the command module is
imported, so a changed or new field default reaches ``--help`` and the parsed value at once.
``tests/cli/test_defaults.py`` checks every command's options against their fields.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import click

__all__ = ["choice_of", "default_of", "device_option"]


def default_of(config: type, name: str) -> Any:
    """Return the default of the field ``name`` of the dataclass ``config``.

    A ``default_factory`` is called, so each caller gets a fresh value. A
    :class:`~enum.StrEnum` member is returned as its plain value, the text ``click.Choice``
    matches (it would match an enum member by its name).

    Raises:
        LookupError: ``config`` has no field ``name`` (with the closest names), or the field
            has no default. Both are mistakes in the command definitions, not user input.
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    if name not in fields:
        close = difflib.get_close_matches(name, fields, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise LookupError(f"{config.__name__} has no field '{name}'{hint}")
    field = fields[name]
    if field.default is not dataclasses.MISSING:
        return str(field.default) if isinstance(field.default, StrEnum) else field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise LookupError(f"{config.__name__}.{name} has no default")


def choice_of(choices: type[StrEnum], *extra: str) -> click.Choice[str]:
    """Return a ``click.Choice`` of the values of ``choices`` (after ``extra`` ones, e.g. auto).

    The values, not the members: ``click.Choice`` would match an enum by its member names.
    """
    return click.Choice([*extra, *(str(c) for c in choices)])


def device_option(config: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Return the ``--device`` option of a command whose config is ``config``.

    The spelling (auto, cpu, cuda, cuda:N) is checked by the config, the GPU's existence
    when the device is chosen (:func:`inkpipe.train.devices.select_device`). Imported here, not
    at the top: the commands without a device (``ingest``, ``info``, ``synth``, ``evaluate``)
    share this module and must not import torch (~0.5 GB of RSS, seconds of start-up).
    """
    from inkpipe.train.devices import DEVICE_HELP

    return click.option(
        "--device",
        default=default_of(config, "device"),
        show_default=True,
        metavar="auto|cpu|cuda|cuda:N",
        help=f"Device: {DEVICE_HELP}.",
    )
