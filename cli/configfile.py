"""``--config FILE``: read a YAML file into the fields of a frozen config dataclass.

The keys of the file are the field names of the config (``TrainConfig`` for ``inkpipe train``,
``PredictConfig`` for ``inkpipe predict``), so the ``config.yaml`` a training run writes is a
valid input. Each value is checked against the field's type annotation where it enters: an
unknown key or a value of the wrong type is a one-line error naming the file, the key and the
fix. Nested configs (``model``, ``loss``) are mappings of their own fields; values that have a
text form (``layers: "28:38"``, ``val: patches:64``) are parsed by the same functions as the
command line. Options given on the command line override the file (see
:func:`given_on_command_line`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import click
import yaml
from click.core import ParameterSource

from inkpipe.pipeline.errors import ConfigError, InputNotFoundError, InvalidInputError

__all__ = ["given_on_command_line", "read_config_file"]

# field type with a text form -> (the function that parses it, an example for messages)
Parsers = Mapping[type, tuple[Callable[[str], Any], str]]


def given_on_command_line(ctx: click.Context) -> frozenset[str]:
    """Return the names of the parameters of ``ctx`` given on the command line (or env)."""
    explicit = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return frozenset(name for name in ctx.params if ctx.get_parameter_source(name) in explicit)


def read_config_file(
    path: Path, config: type, parsers: Parsers | None = None, section: str | None = None
) -> dict[str, Any]:
    """Return the fields a YAML file sets, converted to the types of ``config``'s fields.

    Args:
        path: the YAML file: a mapping of field names to values.
        config: the frozen config dataclass whose fields the keys name.
        parsers: for field types with a text form, the function that parses it (raising
            :class:`ConfigError` on bad text) and an example, e.g.
            ``{LayerRange: (parse_layers, "'28:38'")}``.
        section: if the file's mapping has this key and no field of that name (e.g. the
            ``config`` of a ``predict.json``), read the fields from there.

    Returns:
        Field name -> value for the keys present (nested dataclasses built); fields the
        file leaves out are absent, so the caller fills them from the command line.

    Raises:
        InputNotFoundError: no file at ``path``.
        InvalidInputError: not YAML, or not a mapping.
        ConfigError: an unknown key, or a value of the wrong type (file and key named).
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(
            f"config file {path} not found; pass a YAML file of {config.__name__} fields, such "
            "as the config.yaml of a training run"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise InvalidInputError(
            f"config file {path} is not valid YAML{line}; write one 'key: value' per line"
        ) from None
    if data is None:
        data = {}
    if section is not None and isinstance(data, dict) and isinstance(data.get(section), dict):
        data = data[section]
    if not isinstance(data, dict):
        raise InvalidInputError(
            f"config file {path} holds a {type(data).__name__}, expected a mapping of "
            f"{config.__name__} fields ('key: value' lines)"
        )
    return _read_fields(data, config, path, "", dict(parsers or {}))


def _read_fields(
    data: dict[Any, Any], config: type, path: Path, prefix: str, parsers: dict[type, Any]
) -> dict[str, Any]:
    hints = typing.get_type_hints(config)
    names = [f.name for f in dataclasses.fields(config)]
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            # stricter than errors.closest: a short key is near too many names ('colour', 'lr')
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.75)
            fix = (
                f"did you mean '{prefix}{near[0]}'?"
                if near
                else f"remove it or use a field of {config.__name__}: {', '.join(names)}"
            )
            raise ConfigError(f"{path}: unknown key '{prefix}{key}'; {fix}")
        out[key] = _convert(value, hints[key], path, f"{prefix}{key}", parsers)
    return out


def _convert(value: Any, hint: Any, path: Path, key: str, parsers: dict[type, Any]) -> Any:
    """Return ``value`` as the type ``hint``, or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        kinds = [h for h in options if h is not type(None)]
        if len(kinds) == 1:
            return _convert(value, kinds[0], path, key, parsers)
        raise TypeError(f"{key}: union {hint} is not supported in config files")  # a bug
    if origin is tuple:
        return _convert_tuple(value, hint, path, key, parsers)
    if hint in parsers:  # before dataclasses: LayerRange has a text form
        parse, example = parsers[hint]
        if not isinstance(value, str):
            base60 = isinstance(value, int) and ":" in example
            fix = f"quote it, {key}: {example} (YAML reads an unquoted 28:38 as a base-60 number)"
            _wrong(path, key, value, f"text like {example}", fix if base60 else None)
        try:
            return parse(value)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {key}: {exc}") from None
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if not isinstance(value, dict):
            _wrong(path, key, value, f"a mapping of {hint.__name__} fields (indented lines)")
        fields = _read_fields(value, hint, path, f"{key}.", parsers)
        try:
            return hint(**fields)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {key}: {exc}") from None
    if hint is bool:
        if not isinstance(value, bool):
            _wrong(path, key, value, "true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _wrong(path, key, value, "an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _wrong(path, key, value, "a number")
        return float(value)
    if hint is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # fragment ids: YAML reads an unquoted 1 as a number
        if not isinstance(value, str):
            _wrong(path, key, value, "text")
        return value
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        if not isinstance(value, str):
            _wrong(path, key, value, f"one of {', '.join(hint)}")
        return value  # the config turns it into the member, or names the closest choice
    if hint is Path:
        if not isinstance(value, str) or not value:
            _wrong(path, key, value, "a path")
        return Path(value)
    raise TypeError(f"{key}: field type {hint} is not supported in config files")  # a bug


def _convert_tuple(value: Any, hint: Any, path: Path, key: str, parsers: dict[type, Any]) -> Any:
    args = typing.get_args(hint)
    if not isinstance(value, list | tuple):
        _wrong(path, key, value, "a list ([a, b] or one '- item' line each)")
    if len(args) == 2 and args[1] is Ellipsis:
        kinds = [args[0]] * len(value)
    else:
        if len(value) != len(args):
            _wrong(path, key, value, f"a list of {len(args)} values")
        kinds = list(args)
    return tuple(
        _convert(v, kind, path, f"{key}[{i}]", parsers)
        for i, (v, kind) in enumerate(zip(value, kinds))
    )


def _wrong(
    path: Path, key: str, value: Any, expected: str, fix: str | None = None
) -> typing.NoReturn:
    raise ConfigError(
        f"{path}: {key}: expected {expected}, got {value!r} ({type(value).__name__}); "
        f"{fix or f'correct {key} in {path.name}'}"
    )
