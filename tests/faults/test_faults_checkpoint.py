"""Fault injection: checkpoints whose pickle would run code, and the --trust-checkpoint opt-in.

The payload opens (creates) a marker file when unpickled. Loading must refuse the file before
anything in it runs: the marker never appears, the error is one line naming the file, what it
holds and the fix, and nothing already in the output folder changes.
"""

from __future__ import annotations

import dataclasses
import enum
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from inkpipe.cli import cli
from inkpipe.pipeline.errors import InvalidInputError, UnsafeCheckpointError
from inkpipe.pipeline.layers import LayerRange
from inkpipe.train.checkpoint import (
    FORMAT,
    checkpoint_payload,
    load_checkpoint,
    plain,
    save_checkpoint,
)
from inkpipe.train.models import ModelSpec, build_model


class Payload:
    """Unpickles as ``open(marker, "w")``: a file appears if the pickle is ever executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def tiny_payload() -> dict:
    layers = LayerRange(2, 6)
    spec = ModelSpec(name="attention-unet", in_channels=layers.k, widths=(4, 8, 16))
    torch.manual_seed(0)
    return checkpoint_payload(
        build_model(spec), spec, layers, tile_px=32, threshold=0.5, metrics={}, config={}
    )


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A real inkpipe checkpoint with the payload hidden in its metrics."""
    payload = tiny_payload()
    payload["metrics"] = {"f05": Payload(marker)}
    torch.save({"format": FORMAT, "version": "0.1.0", **payload}, path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_the_payload_is_live(tmp_path):
    """Control: the full pickle does run the payload (so the refusals below mean something)."""
    marker = tmp_path / "control_marker"
    path = hostile_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_load_checkpoint_refuses_a_pickle_payload(tmp_path):
    marker = tmp_path / "marker"
    path = hostile_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "io.open" in message and "--trust-checkpoint" in message
    assert isinstance(info.value, InvalidInputError)  # callers catching the old type still do
    assert not marker.exists()


def test_a_raw_pickle_payload_is_refused_too(tmp_path):
    """Not even torch's zip container: a bare pickle file named .pt."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": FORMAT, "x": Payload(marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_predict_refuses_a_pickle_payload_and_keeps_earlier_outputs(tiny_store, tmp_path):
    marker = tmp_path / "marker"
    path = hostile_checkpoint(tmp_path / "evil.pt", marker)
    out = tmp_path / "pred"
    out.mkdir()
    (out / "submission.csv").write_text("Id,Predicted\na,1 2\n")
    before = snapshot(out)
    args = ["predict", "--checkpoint", str(path), "--store", str(tiny_store), "a"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out), "--quiet"])
    assert_one_line_error(result, str(path), "io.open", "--trust-checkpoint")
    assert not marker.exists()
    assert snapshot(out) == before


def test_resume_refuses_a_pickle_payload_and_keeps_the_run(tiny_store, tmp_path):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    run.mkdir()
    hostile_checkpoint(run / "last.pt", marker)
    (run / "metrics.csv").write_text("epoch\n1\n")
    before = snapshot(run)
    args = ["train", "--store", str(tiny_store), "--out", str(run), "--layers", "2:6"]
    args += ["--tile", "32", "--epochs", "1", "--steps-per-epoch", "1", "--resume", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert_one_line_error(result, str(run / "last.pt"), "--trust-checkpoint")
    assert not marker.exists()
    assert snapshot(run) == before


@dataclasses.dataclass(frozen=True)
class Legacy:
    x: int = 1


class Color(enum.Enum):
    RED = "red"


def test_save_checkpoint_writes_only_what_weights_only_reads(tmp_path):
    payload = tiny_payload()
    payload["metrics"] = {
        "f05": np.float64(0.25),
        "n": np.int64(3),
        "ok": np.bool_(True),
        "curve": np.arange(4, dtype=np.float32),
        "where": Path("/x/y"),
        "spec": Legacy(),
        "color": Color.RED,
        "ids": {"b", "a"},
        "pair": (np.int32(1), 2),
    }
    path = save_checkpoint(tmp_path / "c.pt", payload)
    raw = torch.load(path, weights_only=True)
    m = raw["metrics"]
    assert m["f05"] == 0.25 and type(m["f05"]) is float
    assert type(m["n"]) is int and m["ok"] is True
    assert torch.equal(m["curve"], torch.arange(4, dtype=torch.float32))
    assert m["where"] == "/x/y" and m["spec"] == {"x": 1} and m["color"] == "red"
    assert m["ids"] == ["a", "b"] and m["pair"] == (1, 2)
    assert load_checkpoint(path).metrics["n"] == 3


def test_plain_keeps_unchanged_containers_and_refuses_unknown_objects():
    state = torch.nn.BatchNorm1d(2).state_dict()  # an OrderedDict with _metadata
    assert plain(state) is state
    with pytest.raises(TypeError, match=r"checkpoint\['m'\]\[0\] is a object"):
        plain({"m": [object()]})


def legacy_checkpoint(path: Path) -> Path:
    """What an older inkpipe could have written: NumPy scalars in the metrics."""
    payload = tiny_payload()
    payload["threshold"] = np.float64(0.5)
    payload["metrics"] = {"f05": np.float64(0.3)}
    torch.save({"format": FORMAT, "version": "0.0.9", **payload}, path)
    return path


def test_legacy_checkpoint_needs_the_opt_in(tmp_path):
    path = legacy_checkpoint(tmp_path / "old.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"numpy\S*scalar.*--trust-checkpoint"):
        load_checkpoint(path)
    ck = load_checkpoint(path, trust=True)
    assert ck.threshold == 0.5 and ck.version == "0.0.9"


def test_predict_trust_checkpoint_loads_a_legacy_file(tiny_store, tmp_path):
    path = legacy_checkpoint(tmp_path / "old.pt")
    out = tmp_path / "pred"
    args = ["predict", "--checkpoint", str(path), "--store", str(tiny_store), "a"]
    args += ["--out", str(out), "--tta", "none", "--quiet"]
    assert_one_line_error(CliRunner().invoke(cli, args), "numpy", "--trust-checkpoint")
    assert not out.exists() or not any(out.iterdir())
    result = CliRunner().invoke(cli, [*args, "--trust-checkpoint"])
    assert result.exit_code == 0, result.output
    assert (out / "submission.csv").is_file()


def test_help_documents_the_opt_in():
    for command in ("predict", "train"):
        result = CliRunner().invoke(cli, [command, "--help"])
        assert result.exit_code == 0 and "--trust-checkpoint" in result.output


def test_a_trained_run_loads_with_weights_only(tiny_store, tmp_path):
    """The whole payload of best.pt and last.pt (EMA on, warm-up schedule) needs no pickle."""
    from inkpipe.train.config import TrainConfig, parse_validation
    from inkpipe.train.loop import train

    cfg = TrainConfig(
        store=tiny_store,
        out=tmp_path / "run",
        layers=LayerRange(2, 6),
        epochs=1,
        steps_per_epoch=2,
        batch_size=4,
        tile_px=32,
        warmup_steps=1,
        val=parse_validation("patches:4"),
        progress=False,
        jitter_px=4,
    )
    (result,) = train(cfg, log=lambda _: None)
    last = torch.load(result.last_path, weights_only=True)
    for key in ("state_dict", "train_state_dict", "optimizer", "scheduler", "scaler", "history"):
        assert key in last, key
    assert torch.load(result.best_path, weights_only=True)["format"] == FORMAT
