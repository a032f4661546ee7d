from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from inkpipe.cli import cli
from inkpipe.infer.rle import decode_rle, encode_rle, read_submission, write_submission
from inkpipe.pipeline.images import read_gray
from inkpipe.pipeline.layers import LayerRange
from inkpipe.train.checkpoint import checkpoint_payload, save_checkpoint
from inkpipe.train.models import ModelSpec, build_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny attention U-Net reading layers 2:6 with 32 px tiles."""
    torch.manual_seed(0)
    layers = LayerRange(2, 6)
    spec = ModelSpec(name="attention-unet", in_channels=layers.k, widths=(4, 8, 16))
    payload = checkpoint_payload(
        build_model(spec), spec, layers, tile_px=32, threshold=0.5, metrics={}, config={}
    )
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", payload)


def test_predict_help():
    result = CliRunner().invoke(cli, ["predict", "--help"])
    assert result.exit_code == 0
    for flag in ("--checkpoint", "--store", "--overlap", "--tta", "--threshold", "--open-px"):
        assert flag in result.output
    assert "flips+rot90" in result.output and "[FRAGMENTS]..." in result.output  # or --config
    result = CliRunner().invoke(cli, ["evaluate", "--help"])
    assert result.exit_code == 0 and "--labels" in result.output and "--beta" in result.output


def test_predict_from_a_store(tiny_store, ckpt, tmp_path):
    out = tmp_path / "pred"
    args = ["predict", "--checkpoint", str(ckpt), "--store", str(tiny_store), "a", "1"]
    args += ["--out", str(out), "--tta", "none", "--threshold", "0.4", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("a ") and "96 x 80" in line for line in lines)
    assert f"submission: {out / 'submission.csv'}" in result.output
    rows = read_submission(out / "submission.csv")
    assert list(rows) == ["a", "1"]
    mask = read_gray(out / "1_mask.png") > 0
    np.testing.assert_array_equal(decode_rle(rows["1"], mask.shape), mask)
    assert np.asarray(Image.open(out / "a_overlay.png")).shape == (96, 80, 3)


def test_predict_errors_are_one_line(tiny_store, ckpt, tmp_path):
    def run(*args: str):
        result = CliRunner().invoke(cli, ["predict", *args, "--out", str(tmp_path), "--quiet"])
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert result.output.startswith("Error: ")
        return result.output

    missing = tmp_path / "missing.pt"
    assert "checkpoint not found" in run("--checkpoint", str(missing), str(tmp_path))
    assert "no checkpoint given" in run("--store", str(tiny_store), "1")
    out = run("--checkpoint", str(ckpt), "--store", str(tiny_store), "nope")
    assert "fragment 'nope' is not in store" in out and "a, 1, 2" in out
    out = run("--checkpoint", str(ckpt), "--overlap", "0.99", "--store", str(tiny_store), "1")
    assert "overlap must be in [0, 0.95]" in out


def _label(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def test_evaluate_gives_the_known_f05(tmp_path):
    labels = tmp_path / "labels"
    truth = np.zeros((20, 30), bool)
    truth[2:12, 5:15] = True  # 100 ink pixels
    _label(labels / "x.png", truth)
    _label(labels / "y" / "inklabels.png", truth)
    pred_x = np.zeros_like(truth)
    pred_x[2:10, 5:15] = True  # tp 80, fp 0, fn 20: F0.5 = 100 / 105
    pred_y = np.zeros_like(truth)
    pred_y[7:17, 5:15] = True  # tp 50, fp 50, fn 50: F0.5 = 0.5
    sub = write_submission(
        tmp_path / "sub.csv", [("x", encode_rle(pred_x)), ("y", encode_rle(pred_y))]
    )
    result = CliRunner().invoke(cli, ["evaluate", str(sub), "--labels", str(labels)])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()}
    assert rows["fragment"][1] == "F0.5"
    assert rows["x"][1:] == ["0.9524", "1.0000", "0.8000", "80", "0", "20"]
    assert rows["y"][1:] == ["0.5000", "0.5000", "0.5000", "50", "50", "50"]
    assert rows["mean"][1] == f"{(100 / 105 + 0.5) / 2:.4f}"
    result = CliRunner().invoke(cli, ["evaluate", str(sub), "--labels", str(labels), "--beta", "1"])
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()}
    assert rows["fragment"][1] == "F1" and rows["x"][1] == f"{160 / 180:.4f}"


def test_evaluate_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(
        cli, ["evaluate", str(tmp_path / "nope.csv"), "--labels", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert result.output.startswith("Error: submission not found")
    assert len(result.output.strip().splitlines()) == 1
