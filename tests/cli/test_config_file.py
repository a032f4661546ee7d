"""``--config FILE`` for ``inkpipe train`` and ``inkpipe predict``: the file's fields, then the
command line's options on top; broken files give one-line errors naming the file and key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import pytest
import torch
import yaml
from click.testing import CliRunner

from inkpipe.cli import cli
from inkpipe.cli.configfile import given_on_command_line
from inkpipe.cli.group import cli as group
from inkpipe.cli.infer import predict_config
from inkpipe.cli.train import train_config
from inkpipe.infer.predict import PredictConfig
from inkpipe.pipeline.errors import ConfigError, InputNotFoundError, InvalidInputError
from inkpipe.pipeline.layers import LayerRange
from inkpipe.train.checkpoint import checkpoint_payload, save_checkpoint
from inkpipe.train.config import TrainConfig, Validation
from inkpipe.train.losses import LossSpec
from inkpipe.train.models import ModelSpec, build_model


def parse_train(*args: str) -> TrainConfig:
    """The TrainConfig ``inkpipe train ARGS`` would run, without running it."""
    cmd = group.get_command(click.Context(group), "train")
    with cmd.make_context("train", list(args)) as ctx:
        params = dict(ctx.params)
        config_file = params.pop("config_file")
        return train_config(params, given_on_command_line(ctx), config_file)


def parse_predict(*args: str) -> PredictConfig:
    cmd = group.get_command(click.Context(group), "predict")
    with cmd.make_context("predict", list(args)) as ctx:
        params = dict(ctx.params)
        config_file = params.pop("config_file")
        return predict_config(params, given_on_command_line(ctx), config_file)


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("Error: ")
    return result.output.strip()[len("Error: ") :]


# a resolved config as a run writes it: every field set, nested specs in full
RESOLVED = TrainConfig(
    store=Path("s.zarr"),
    out=Path("runs/a"),
    layers=LayerRange(2, 6),
    fragments=("1", "2"),
    model=ModelSpec(name="attention-unet", in_channels=4, widths=(4, 8, 16), output_stride=2),
    tile_px=32,
    loss=LossSpec(name="focal+dice", focal_gamma=1.5, dice_weight=0.3),
    epochs=3,
    batch_size=4,
    lr=3e-4,
    val=Validation("patches", 8),
    max_minutes=2.5,
    progress=False,
)


def test_the_config_yaml_a_run_writes_reads_back_to_the_same_config(tmp_path):
    f = write_yaml(tmp_path / "config.yaml", RESOLVED.to_dict())
    assert parse_train("--config", str(f)) == RESOLVED


def test_command_line_options_override_the_file(tmp_path):
    f = write_yaml(tmp_path / "config.yaml", RESOLVED.to_dict())
    cfg = parse_train("--config", str(f), "--epochs", "5", "--out", "runs/b", "--no-resume")
    assert cfg == dataclasses.replace(RESOLVED, epochs=5, out=Path("runs/b"), resume=False)
    # one field of a nested spec: the file's other fields stay
    cfg = parse_train("--config", str(f), "--focal-alpha", "0.5")
    assert cfg.loss == dataclasses.replace(RESOLVED.loss, focal_alpha=0.5)
    # new layers: the file's model reads the new k
    cfg = parse_train("--config", str(f), "--layers", "1:9")
    assert cfg.layers == LayerRange(1, 9) and cfg.model == dataclasses.replace(
        RESOLVED.model, in_channels=8
    )
    # a new --model replaces the file's spec; --quiet, --resume and --tensorboard are flags
    cfg = parse_train("--config", str(f), "--model", "stem3d", "--resume", "--tensorboard")
    assert cfg.model is not None and cfg.model.name == "stem3d" and cfg.resume and cfg.tensorboard


def test_a_partial_file_leaves_the_rest_to_the_defaults(tmp_path):
    f = write_yaml(tmp_path / "run.yaml", {"store": "s.zarr", "lr": 0.01, "fragments": [1, 2]})
    cfg = parse_train("--config", str(f))
    expected = TrainConfig(store=Path("s.zarr"), out=Path("runs/train"), lr=0.01)
    assert cfg == dataclasses.replace(expected, fragments=("1", "2"))  # ids read as text
    assert parse_train("--store", "t.zarr", "--config", str(f)).store == Path("t.zarr")


def test_without_a_config_the_options_are_what_they_were(tmp_path):
    cfg = parse_train("--store", "s.zarr", "--lr", "0.01", "--quiet", "--focal-gamma", "1")
    expected = TrainConfig(store=Path("s.zarr"), out=Path("runs/train"), lr=0.01, progress=False)
    assert cfg == dataclasses.replace(expected, loss=LossSpec(focal_gamma=1.0))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("store: s.zarr\nepoch: 3\n", "unknown key 'epoch'; did you mean 'epochs'?"),
        ("epochs: ten\n", "epochs: expected an integer, got 'ten' (str)"),
        ("lr: [1]\n", "lr: expected a number, got [1] (list)"),
        ("resume: 1\n", "resume: expected true or false, got 1 (int)"),
        ("layers: 28:38\n", "layers: expected text like '28:38', got 1718 (int); quote it, "),
        ("layers: '38:28'\n", "layers: expected layers as START:STOP with 0 <= START < STOP"),
        ("val: twelve\n", "val: expected --val regions[:F] (0 < F <= 0.5), patches:N"),
        ("loss: {focal_gama: 2}\n", "key 'loss.focal_gama'; did you mean 'loss.focal_gamma'?"),
        ("loss: {gama: 2}\n", "key 'loss.gama'; remove it or use a field of LossSpec: name,"),
        ("loss: focal\n", "loss: expected a mapping of LossSpec fields"),
        ("model: {name: nope}\n", "model: unknown model 'nope'"),
        ("model: {name: unet, widths: [1, 2]}\n", "model.widths: expected a list of 3 values"),
        ("fragments: 1\n", "fragments: expected a list"),
        ("aug: 3\n", "aug: expected one of none, light, full, got 3 (int)"),
        ("loss: {name: [bce]}\n", "loss.name: expected one of bce, focal, dice, bce+dice,"),
    ],
)
def test_broken_values_name_the_file_and_the_key(tmp_path, text, words):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    message = one_line_error(["train", "--store", "s.zarr", "--config", str(f)])
    assert message.startswith(f"{f}: ") and words in message, message


def test_unknown_key_lists_the_fields(tmp_path):
    f = write_yaml(tmp_path / "run.yaml", {"lr": 0.1, "colour": "red"})
    with pytest.raises(ConfigError) as e:
        parse_train("--config", str(f))
    assert "use a field of TrainConfig: store, out, layers" in str(e.value)


def test_broken_files_are_one_line(tmp_path):
    missing = tmp_path / "missing.yaml"
    message = one_line_error(["train", "--config", str(missing)])
    assert message.startswith(f"config file {missing} not found; pass a YAML file of TrainConfig")
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: s.zarr\nlr: [0.1\n")
    assert "is not valid YAML at line 3" in one_line_error(["train", "--config", str(bad)])
    listed = write_yaml(tmp_path / "list.yaml", [1, 2])
    message = one_line_error(["train", "--config", str(listed)])
    assert message == f"config file {listed} holds a list, expected a mapping of TrainConfig " + (
        "fields ('key: value' lines)"
    )
    with pytest.raises(InputNotFoundError):
        parse_train("--config", str(missing))
    with pytest.raises(InvalidInputError):
        parse_train("--config", str(bad))


def test_no_store_anywhere_is_one_line(tmp_path):
    f = write_yaml(tmp_path / "run.yaml", {"lr": 0.1})
    for args in (["train"], ["train", "--config", str(f)]):
        assert one_line_error(args).startswith("no store given; pass --store STORE.zarr")


def test_a_real_run_config_yaml_trains_again(tiny_store, tmp_path):
    first = tmp_path / "first"
    args = ["train", "--store", str(tiny_store), "--out", str(first), "--layers", "2:6"]
    args += ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--val", "patches:2"]
    result = CliRunner().invoke(cli, [*args, "--quiet", "--lr", "0.002"])
    assert result.exit_code == 0, result.output
    second = tmp_path / "second"
    again = ["train", "--config", str(first / "config.yaml"), "--out", str(second)]
    result = CliRunner().invoke(cli, again)
    assert result.exit_code == 0, result.output
    a = yaml.safe_load((first / "config.yaml").read_text())
    b = yaml.safe_load((second / "config.yaml").read_text())
    assert b.pop("out") == str(second) and a.pop("out") == str(first)
    assert a == b and b["lr"] == 0.002 and b["progress"] is False


# ------------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec(name="attention-unet", in_channels=4, widths=(4, 8, 16))
    payload = checkpoint_payload(
        build_model(spec), spec, LayerRange(2, 6), tile_px=32, threshold=0.5, metrics={}, config={}
    )
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", payload)


def test_predict_reads_a_file_and_the_command_line_overrides_it(tmp_path, ckpt, tiny_store):
    settings = {"checkpoints": [str(ckpt)], "fragments": ["1"], "store": str(tiny_store)}
    settings |= {"out": str(tmp_path / "p"), "tta": "none", "overlap": 0.25, "progress": False}
    f = write_yaml(tmp_path / "predict.yaml", settings)
    cfg = parse_predict("--config", str(f))
    assert cfg == PredictConfig(
        checkpoints=(ckpt,),
        fragments=("1",),
        store=tiny_store,
        out=tmp_path / "p",
        tta="none",
        overlap=0.25,
        progress=False,
    )
    cfg = parse_predict("--config", str(f), "a", "--tta", "flips", "--out", "q")
    assert (cfg.fragments, cfg.tta, cfg.out, cfg.overlap) == (("a",), "flips", Path("q"), 0.25)
    result = CliRunner().invoke(cli, ["predict", "--config", str(f)])
    assert result.exit_code == 0, result.output
    # the predict.json a run writes is a valid input too (its "config" section)
    record = tmp_path / "p" / "predict.json"
    assert parse_predict("--config", str(record)) == parse_predict("--config", str(f))
    assert json.loads(record.read_text())["config"]["tta"] == "none"


def test_predict_config_errors_are_one_line(tmp_path, ckpt):
    f = write_yaml(tmp_path / "p.yaml", {"checkpoint": [str(ckpt)]})
    message = one_line_error(["predict", "--config", str(f)])
    assert message.startswith(f"{f}: unknown key 'checkpoint'; did you mean 'checkpoints'?")
    f = write_yaml(tmp_path / "p.yaml", {"checkpoints": [str(ckpt)], "fragments": ["1"]})
    assert one_line_error(["predict", "--config", str(f)]).startswith("no output folder given")
    message = one_line_error(["predict", "--config", str(f), "--out", "o", "--overlap", "2"])
    assert "overlap must be in [0, 0.95]" in message
    f = write_yaml(tmp_path / "p.yaml", {"batch_size": 2.5})
    assert "batch_size: expected an integer, got 2.5" in one_line_error(
        ["predict", "--config", str(f)]
    )
