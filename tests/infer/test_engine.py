"""The device-side predictor: TTA on the device, precision, torch.compile, the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inkpipe.infer import engine
from inkpipe.infer.engine import (
    Precision,
    autocast_dtype,
    compiled,
    device_predictor,
    host_predictor,
)
from inkpipe.infer.predict import (
    PredictConfig,
    build_predictor,
    load_models,
    predict,
    probability_to_uint8,
)
from inkpipe.infer.tta import TtaMode, ensemble, with_tta
from inkpipe.numerics.blending import sliding_window_predict
from inkpipe.pipeline.errors import ConfigError
from inkpipe.pipeline.images import read_gray
from inkpipe.pipeline.layers import LayerRange
from inkpipe.pipeline.store import open_fragments
from inkpipe.pipeline.volume import Normalizer, VolumeView
from inkpipe.train.checkpoint import (
    checkpoint_payload,
    make_predictor,
    model_from_checkpoint,
    save_checkpoint,
    upsample_bilinear,
)
from inkpipe.train.models import ModelSpec, build_model
from tests.infer.test_predict import make_checkpoint

CPU = torch.device("cpu")
LAYERS = LayerRange(2, 6)
TILE = 32
MODES = list(TtaMode)


COARSE = ModelSpec(name="stem3d", in_channels=LAYERS.k, encoder="small", output_stride=4)


def coarse_net() -> torch.nn.Module:
    """The CPU recipe's design, tiny: a 3-D stem and the small 2-D U-Net, logits at 1/4.

    Its head is scaled and centred (as ``make_checkpoint`` does), so the untrained net gives
    a map of varied probabilities rather than ~0.5 everywhere.
    """
    torch.manual_seed(0)
    model = build_model(COARSE).eval()
    head = model.net2d.head
    x = torch.randn(4, LAYERS.k, TILE, TILE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head.bias.zero_()
        head.weight.mul_(2.0 / model(x).std())  # logits of std 2
        head.bias.sub_(model(x).mean())
    return model


def flat_net() -> torch.nn.Module:
    """A 2-D network at full resolution."""
    torch.manual_seed(1)
    spec = ModelSpec(name="attention-unet", in_channels=LAYERS.k, widths=(4, 8, 16))
    return build_model(spec).eval()


def batch(n: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, LAYERS.k, TILE, TILE)).astype(np.float32)


def old_predictor(model: torch.nn.Module) -> engine.HostPredictor:
    """The NumPy predictor predict used before, copied here to pin its numbers."""

    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch))
        with torch.inference_mode():
            logits = model(x).float()
            if logits.shape[-2:] != x.shape[-2:]:
                logits = torch.nn.functional.interpolate(
                    logits, size=x.shape[-2:], mode="bilinear", align_corners=False
                )
            prob = torch.sigmoid(logits)
        return prob[:, 0].cpu().numpy().astype(np.float32)

    return predict


def old_path(model: torch.nn.Module, mode: TtaMode) -> engine.HostPredictor:
    """What predict ran before: NumPy TTA around a NumPy predictor, a device copy per flip."""
    return with_tta(old_predictor(model), mode)


def test_make_predictor_gives_the_old_numbers():
    for net in (coarse_net, flat_net):
        model = net()
        np.testing.assert_allclose(
            make_predictor(model, CPU)(batch()), old_predictor(model)(batch()), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("net", [coarse_net, flat_net])
@pytest.mark.parametrize("mode", MODES)
def test_tta_on_the_device_equals_tta_in_numpy(net, mode):
    model = net()
    x = batch()
    expected = old_path(model, mode)(x)
    got = host_predictor(with_tta(device_predictor(model, CPU), mode), CPU)(x)
    assert got.dtype == np.float32 and got.shape == (3, TILE, TILE)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    # flip in, predict, flip back: each pass of the device TTA by hand gives the same map
    dev = device_predictor(model, CPU)
    t = torch.from_numpy(x)
    flips = [dev(t), dev(t.flip(-1)).flip(-1), dev(t.flip(-2)).flip(-2)]
    flips.append(dev(t.flip(-2, -1)).flip(-2, -1))
    if mode == TtaMode.FLIPS:
        np.testing.assert_allclose(got, (sum(flips) / 4).numpy(), atol=1e-6, rtol=0)


def test_one_copy_in_and_one_out_per_batch():
    """TTA and the ensemble call the device predictors; the host adapter converts once."""
    seen: list[type] = []

    def on_device(x):
        seen.append(type(x))
        return x.mean(dim=1)

    members = [with_tta(on_device, "flips+rot90"), with_tta(on_device, "flips")]
    predictor = host_predictor(ensemble(members), CPU)
    out = predictor(batch())
    assert isinstance(out, np.ndarray) and out.shape == (3, TILE, TILE)
    assert seen == [torch.Tensor] * 12  # every pass sees a tensor: no NumPy inside
    np.testing.assert_allclose(out, batch().mean(axis=1), atol=1e-6)


def test_precision_choices():
    cuda = torch.device("cuda", 0)
    assert autocast_dtype("auto", CPU) is None  # float32 on the CPU by default
    assert autocast_dtype("auto", cuda) is torch.float16  # as make_predictor always did
    assert autocast_dtype(Precision.FP32, cuda) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("fp16", cuda) is torch.float16
    with pytest.raises(ConfigError, match="did you mean 'bf16'"):
        autocast_dtype("bf61", CPU)


def test_bfloat16_on_the_cpu_is_close_to_float32():
    model = coarse_net()
    x = batch()
    full = host_predictor(device_predictor(model, CPU, "fp32"), CPU)(x)
    half = host_predictor(device_predictor(model, CPU, "bf16"), CPU)(x)
    assert half.dtype == np.float32  # the sigmoid runs in float32 whatever the precision
    assert not np.array_equal(half, full)  # autocast did run in bfloat16
    np.testing.assert_allclose(half, full, atol=0.05)


def test_compile_that_fails_at_once_falls_back_with_one_warning(monkeypatch):
    def broken(model, **kw):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    model = coarse_net()
    lines: list[str] = []
    predictor = host_predictor(device_predictor(model, CPU, compile=True, warn=lines.append), CPU)
    np.testing.assert_array_equal(predictor(batch()), make_predictor(model, CPU)(batch()))
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("warning: torch.compile failed (RuntimeError: no compiler here)")


def test_compile_that_fails_at_the_first_call_falls_back_once(monkeypatch):
    calls = []

    def lazy(model, **kw):
        def run(x):
            calls.append(x.shape)
            raise RuntimeError("inductor: C++ compile error")

        return run

    monkeypatch.setattr(torch, "compile", lazy)
    model = flat_net()
    lines: list[str] = []
    forward = compiled(model, warn=lines.append)
    x = torch.from_numpy(batch())
    with torch.inference_mode():
        torch.testing.assert_close(forward(x), model(x))
        torch.testing.assert_close(forward(x[:1]), model(x[:1]))
    assert len(calls) == 1 and len(lines) == 1  # not tried again, warned once


def test_compile_default_warning_is_a_runtime_warning(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kw: (_ for _ in ()).throw(OSError("x")))
    with pytest.warns(RuntimeWarning, match="running the model uncompiled"):
        forward = compiled(flat_net())
    assert isinstance(forward, torch.nn.Module)


def test_an_error_of_the_model_itself_is_raised(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kw: lambda x: model(x))
    forward = compiled(flat_net(), warn=lambda s: None)
    with pytest.raises(RuntimeError, match="channels"):
        forward(torch.zeros(1, LAYERS.k + 1, TILE, TILE))  # wrong channel count, both ways


@pytest.fixture(scope="module")
def coarse_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    payload = checkpoint_payload(coarse_net(), COARSE, LAYERS, TILE, 0.5, {}, {})
    return save_checkpoint(tmp_path_factory.mktemp("engine") / "coarse.pt", payload)


@pytest.fixture(scope="module")
def flat_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("engine") / "flat.pt")


@pytest.mark.parametrize("which", ["coarse", "flat", "ensemble"])
@pytest.mark.parametrize("mode", ["none", "flips"])
def test_tiled_prediction_gives_the_old_numbers(tiny_store, coarse_ckpt, flat_ckpt, which, mode):
    """The new pipeline (tiles read in a thread, TTA on the device) equals the old one."""
    ckpts = {"coarse": [coarse_ckpt], "flat": [flat_ckpt], "ensemble": [coarse_ckpt, flat_ckpt]}
    models = load_models(ckpts[which])
    frag = open_fragments(tiny_store, ["1"])[0]
    mask = frag.mask()
    norm = Normalizer(frag.layer_stats()[LAYERS.as_slice()])
    old_predictor = ensemble(
        [old_path(model_from_checkpoint(ck), TtaMode(mode)) for ck in models.checkpoints]
    )
    # the old path: each tile cut in the calling thread, NumPy TTA
    old = sliding_window_predict(
        np.asarray(VolumeView(frag.volume, LAYERS, norm)),
        old_predictor,
        TILE,
        16,
        4,
        valid=mask,
        read_ahead=0,
    )
    new = sliding_window_predict(
        VolumeView(frag.volume, LAYERS, norm),
        build_predictor(models, "cpu", mode),
        TILE,
        16,
        4,
        valid=mask,
    )
    assert old.std() > 2e-3  # a non-trivial map (1e-5 would see a change)
    np.testing.assert_allclose(new, old, atol=1e-5, rtol=0)


def test_predict_writes_the_old_probabilities(tiny_store, flat_ckpt, tmp_path):
    out = tmp_path / "out"
    cfg = PredictConfig(
        checkpoints=(flat_ckpt,),
        fragments=("1",),
        out=out,
        store=tiny_store,
        batch_size=4,
        progress=False,
    )
    lines: list[str] = []
    (result,) = predict(cfg, log=lines.append)
    assert any("precision auto" in line for line in lines)
    frag = open_fragments(tiny_store, ["1"])[0]
    mask = frag.mask()
    view = np.asarray(
        VolumeView(frag.volume, LAYERS, Normalizer(frag.layer_stats()[LAYERS.as_slice()]))
    )
    model = model_from_checkpoint(load_models([flat_ckpt]).checkpoints[0])
    old = sliding_window_predict(
        view, old_path(model, TtaMode.FLIPS), TILE, 16, 4, valid=mask, read_ahead=0
    )
    expected = probability_to_uint8(old * mask)
    got = read_gray(result.probability_png)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # rounding at .5 only
    assert np.mean(got != expected) < 0.01


def test_predict_config_precision_and_compile(tmp_path):
    base = {"checkpoints": (tmp_path / "c.pt",), "fragments": ("a",), "out": tmp_path}
    cfg = PredictConfig(**base, precision="bf16", compile=True)
    assert cfg.precision is Precision.BF16 and cfg.compile
    assert PredictConfig(**base).precision is Precision.AUTO
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        PredictConfig(**base, precision="fp8")


@pytest.mark.parametrize(
    ("small", "big"),
    [((16, 16), (64, 64)), ((8, 4), (64, 64)), ((7, 5), (30, 11)), ((1, 1), (4, 4))],
)
def test_upsampling_matches_interpolate(small, big):
    logits = torch.randn(3, 2, *small, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(
        logits, size=big, mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(upsample_bilinear(logits, big), expected, atol=2e-6, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert upsample_bilinear(logits, big).dtype == torch.float32
