"""``--device`` of ``inkpipe train`` and ``inkpipe predict``: cuda:N, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from inkpipe.cli import cli
from inkpipe.pipeline.layers import LayerRange
from inkpipe.train.checkpoint import checkpoint_payload, save_checkpoint
from inkpipe.train.models import ModelSpec, build_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ModelSpec(name="attention-unet", in_channels=4, widths=(4, 8, 16))
    payload = checkpoint_payload(
        build_model(spec), spec, LayerRange(2, 6), tile_px=32, threshold=0.5, metrics={}, config={}
    )
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", payload)


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith("Error: ")
    return result.output.strip()


@pytest.mark.parametrize("command", ["train", "predict"])
def test_help_names_cuda_n(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "auto|cpu|cuda|cuda:N" in result.output and "LOCAL_RANK" in result.output


def test_train_refuses_an_unknown_device(tmp_path):
    out = one_line_error(["train", "--store", str(tmp_path), "--device", "gpu"])
    assert "unknown device 'gpu'" in out and "cuda:N" in out


def test_train_cuda_n_without_a_gpu(monkeypatch, tmp_path):
    fake_gpus(monkeypatch, 0)
    out = one_line_error(["train", "--store", str(tmp_path), "--device", "cuda:1"])
    assert out.endswith(
        "--device cuda:1 was asked for but no CUDA GPU is available; use auto or cpu"
    )


def test_train_cuda_n_beyond_the_gpus(monkeypatch, tmp_path):
    fake_gpus(monkeypatch, 2)
    out = one_line_error(["train", "--store", str(tmp_path), "--device", "cuda:3"])
    assert "--device cuda:3: there is no GPU 3, 2 CUDA GPU(s) are visible" in out


def test_predict_cuda_n_beyond_the_gpus(monkeypatch, tiny_store, ckpt, tmp_path):
    fake_gpus(monkeypatch, 2)
    args = ["predict", "--checkpoint", str(ckpt), "--store", str(tiny_store), "1"]
    out = one_line_error([*args, "--out", str(tmp_path), "--device", "cuda:5", "--quiet"])
    assert "--device cuda:5: there is no GPU 5, 2 CUDA GPU(s) are visible" in out


def test_predict_refuses_an_unknown_device(ckpt, tmp_path):
    args = ["predict", "--checkpoint", str(ckpt), "a", "--out", str(tmp_path)]
    out = one_line_error([*args, "--device", "cuda:one"])
    assert "unknown device 'cuda:one'" in out


def test_predict_on_the_cpu_by_name(tiny_store, ckpt, tmp_path):
    args = ["predict", "--checkpoint", str(ckpt), "--store", str(tiny_store), "1"]
    args += ["--out", str(tmp_path / "p"), "--device", "cpu", "--tta", "none", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "submission.csv").is_file()
