"""Every option that fills a config field defaults to that field's default (one source of truth).

The values are the ones click passes to the command when an option is not given, read by
parsing a command line with only the required arguments. A new option must appear here, either
mapped to its field or listed as filling none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click
import pytest

from inkpipe.cli.demo import DemoConfig
from inkpipe.cli.group import COMMANDS, cli
from inkpipe.cli.options import default_of
from inkpipe.infer.evaluate import EvaluateConfig
from inkpipe.infer.predict import PredictConfig
from inkpipe.pipeline.ingest import IngestConfig
from inkpipe.pipeline.layers import parse_layers
from inkpipe.pipeline.store import StoreSettings
from inkpipe.pipeline.synth import SynthConfig
from inkpipe.train.config import TrainConfig, parse_validation
from inkpipe.train.losses import LossSpec
from inkpipe.train.models import ModelSpec


def _not(value: bool) -> bool:
    return not value


def _size(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x"))


# option name -> (config, field or fields, how the option's value becomes the field's value)
Field = tuple[type, str | tuple[str, ...], Callable[[Any], Any] | None]


@dataclasses.dataclass(frozen=True)
class Case:
    """How the options of one command map to config fields."""

    required: list[str]  # the shortest valid command line
    config: type | None  # options named like one of its fields fill that field
    fields: dict[str, Field]  # options named differently, or whose value is converted
    no_field: frozenset[str]  # options that fill no field with a default


STORE_SETTINGS = frozenset(f.name for f in dataclasses.fields(StoreSettings))

CASES = {
    "synth": Case(["out"], SynthConfig, {}, frozenset({"out"})),
    "ingest": Case(
        ["frags", "--out", "s.zarr"],
        IngestConfig,
        {
            "fragment_ids": (IngestConfig, "fragment_ids", lambda ids: ids or None),
            "quiet": (IngestConfig, "progress", _not),
        },
        # root and out have no default; the store settings are overrides (None) whose help
        # shows the StoreSettings default, see test_ingest_settings_help_shows_their_defaults
        frozenset({"fragments", "out"}) | STORE_SETTINGS,
    ),
    "info": Case(["s.zarr"], None, {}, frozenset({"store"})),
    "train": Case(
        ["--store", "s.zarr"],
        TrainConfig,
        {
            "layers": (TrainConfig, "layers", parse_layers),
            "val": (TrainConfig, "val", parse_validation),
            "fragments": (TrainConfig, "fragments", lambda ids: ids or None),
            "model": (TrainConfig, "model", lambda name: None if name == "auto" else name),
            "encoder": (ModelSpec, "encoder", None),
            "encoder_weights": (ModelSpec, "encoder_weights", None),
            "loss": (LossSpec, "name", None),
            "focal_alpha": (LossSpec, "focal_alpha", None),
            "focal_gamma": (LossSpec, "focal_gamma", None),
            "label_smoothing": (LossSpec, "label_smoothing", None),
            "output_stride": (TrainConfig, "output_stride", None),
            "quiet": (TrainConfig, "progress", _not),
        },
        # TrainConfig.out has no default: runs/train is the command line's own; --config
        # names a file of fields
        frozenset({"store", "out", "config_file"}),
    ),
    "predict": Case(
        ["a", "--out", "pred"],
        PredictConfig,
        {"quiet": (PredictConfig, "progress", _not)},
        frozenset({"fragments", "checkpoints", "out", "config_file"}),
    ),
    "evaluate": Case(
        ["sub.csv", "--labels", "truth"],
        EvaluateConfig,
        {},
        frozenset({"submission", "labels"}),
    ),
    "demo": Case(
        [],
        DemoConfig,
        {
            "size": (DemoConfig, ("height_px", "width_px"), _size),
            "quiet": (DemoConfig, "progress", _not),
        },
        frozenset(),
    ),
}


def command(name: str) -> click.Command:
    cmd = cli.get_command(click.Context(cli), name)
    assert cmd is not None
    return cmd


def unset_values(name: str) -> dict[str, Any]:
    """Return what click passes to command ``name`` for every option left out."""
    cmd = command(name)
    with cmd.make_context(name, list(CASES[name].required)) as ctx:
        return dict(ctx.params)


def test_every_command_has_a_case():
    assert set(CASES) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_option_defaults_are_the_config_defaults(name):
    case = CASES[name]
    names = {f.name for f in dataclasses.fields(case.config)} if case.config else set()
    values = unset_values(name)
    checked = set()
    for param, value in values.items():
        if param in case.no_field:
            continue
        if param in case.fields:
            config, field, convert = case.fields[param]
        elif param in names and case.config:
            config, field, convert = case.config, param, None
        else:
            raise AssertionError(f"{name} {param}: map it to a config field or list it in no_field")
        expected = (
            tuple(default_of(config, f) for f in field)
            if isinstance(field, tuple)
            else default_of(config, field)
        )
        got = convert(value) if convert else value
        assert got == expected, f"{name} --{param}: default {got!r}, {config.__name__} {expected!r}"
        checked.add(param)
    assert checked | case.no_field == set(values)


@pytest.mark.parametrize("name", sorted(CASES))
def test_numeric_options_have_their_fields_type(name):
    """A float field with an int default (cache_mb = 1024) must still parse --cache-mb 0.5."""
    case = CASES[name]
    if case.config is None:
        return
    types = {f.name: f.type for f in dataclasses.fields(case.config)}
    for param in command(name).params:
        annotation = str(types.get(param.name, ""))
        if param.name in case.fields or param.name in case.no_field:
            continue
        if annotation.startswith("float"):
            assert param.type is click.FLOAT, (name, param.name)
        elif annotation.startswith("int"):
            assert param.type is click.INT, (name, param.name)


def test_ingest_settings_help_shows_their_defaults():
    params = {p.name: p for p in command("ingest").params}
    for field in dataclasses.fields(StoreSettings):
        option = params[field.name]
        assert unset_values("ingest")[field.name] is None  # unset: the manifest may set it
        assert f"[{field.default}]" in option.help, (field.name, option.help)


@dataclasses.dataclass(frozen=True)
class _Example:
    required: int
    plain: int = 3
    made: list[int] = dataclasses.field(default_factory=lambda: [1, 2])


def test_default_of_reads_defaults_and_factories():
    assert default_of(_Example, "plain") == 3
    assert default_of(_Example, "made") == [1, 2]
    assert default_of(_Example, "made") is not default_of(_Example, "made")  # a fresh value
    with pytest.raises(LookupError, match="no field 'plan'; did you mean plain"):
        default_of(_Example, "plan")
    with pytest.raises(LookupError, match="_Example.required has no default"):
        default_of(_Example, "required")
