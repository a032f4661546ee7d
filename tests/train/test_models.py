from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from collections.abc import Iterator

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

from inkpipe.pipeline.errors import ConfigError, InputNotFoundError, OfflineError
from inkpipe.train import weights
from inkpipe.train.models import (
    AttentionGate,
    AttentionUNet,
    DoubleConv,
    ModelName,
    ModelSpec,
    VideoResNet,
    build_model,
    count_parameters,
)
from inkpipe.train.nets3d import VIDEO_RESNETS

OFFLINE_MESSAGE = (
    "could not download imagenet weights for efficientnet-b0 (offline?): pass --encoder-weights "
    "PATH to a local encoder state dict, or --encoder-weights none"
)


class Hung(BaseException):
    """Raised by :func:`deadline`; a BaseException so no ``except Exception`` swallows it."""


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (the hub client retries for ~23 s when it thinks it's online)."""

    def _raise(signum: int, frame: object) -> None:
        raise Hung(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _unet_spec(**kwargs: object) -> ModelSpec:
    return ModelSpec(name="unet", **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", list(ModelName))
@pytest.mark.parametrize("k", [1, 10, 30])
def test_models_map_k_layers_to_one_logit_map(name: str, k: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name=name, in_channels=k)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, k, 32, 32))
    assert out.shape == (2, 1, 32, 32)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("hw", [(224, 224), (40, 56), (37, 50)])
def test_attention_unet_takes_any_size(hw: tuple[int, int]) -> None:
    model = AttentionUNet(in_channels=2, widths=(4, 8, 16)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 2, *hw)).shape == (1, 1, *hw)


def test_attention_unet_rejects_tiny_input() -> None:
    with pytest.raises(ValueError, match="H, W >= 8"):
        AttentionUNet(in_channels=1)(torch.randn(1, 1, 4, 16))


# ---------------------------------------------------------------------------- architecture


def test_attention_unet_has_the_original_widths() -> None:
    model = build_model(ModelSpec(in_channels=10))
    assert isinstance(model, AttentionUNet)
    levels = [model.enc1, model.enc2, model.enc3, model.bottleneck]
    assert [(m.in_channels, m.out_channels) for m in levels] == [
        (10, 40),
        (40, 80),
        (80, 160),
        (160, 320),
    ]
    for level in levels:
        assert isinstance(level, DoubleConv)
        convs = [m for m in level if isinstance(m, nn.Conv2d)]
        assert [c.kernel_size for c in convs] == [(3, 3), (3, 3)]
        assert sum(isinstance(m, nn.BatchNorm2d) for m in level) == 2
        assert sum(isinstance(m, nn.ReLU) for m in level) == 2
    decoder_out = [d.conv.out_channels for d in (model.dec3, model.dec2, model.dec1)]
    assert decoder_out == [160, 80, 40]
    assert model.head.in_channels == 40 and model.head.out_channels == 1
    assert model.drop.p == pytest.approx(0.1)
    assert [d.drop.p for d in (model.dec3, model.dec2, model.dec1)] == [0.15] * 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 1  # reused 3 times


def test_attention_unet_widths_are_configurable() -> None:
    model = build_model(ModelSpec(in_channels=3, widths=(8, 16, 32)))
    assert isinstance(model, AttentionUNet)
    assert model.bottleneck.out_channels == 64
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_attention_gates_sit_on_all_three_skips_and_gate() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(in_channels=10)).eval()
    assert isinstance(model, AttentionUNet)
    gates = model.gates
    assert len(gates) == 3 and all(isinstance(g, AttentionGate) for g in gates)
    assert len({id(g) for g in gates}) == 3
    assert sum(isinstance(m, AttentionGate) for m in model.modules()) == 3

    alphas: list[torch.Tensor] = []
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    handles = []
    for gate in gates:
        handles.append(gate.psi.register_forward_hook(lambda m, i, o: alphas.append(o)))
        handles.append(gate.register_forward_hook(lambda m, i, o: calls.append((i[0], i[1], o))))
    with torch.no_grad():
        model(torch.randn(2, 10, 32, 32))
    for h in handles:
        h.remove()

    assert [tuple(a.shape) for a in alphas] == [(2, 1, 8, 8), (2, 1, 16, 16), (2, 1, 32, 32)]
    skip_channels = [160, 80, 40]
    for alpha, (g, x, out), c in zip(alphas, calls, skip_channels, strict=True):
        assert x.shape[1] == c  # the encoder skip is what gets gated
        assert g.shape[1] == 2 * c  # the gating signal comes from the level below
        assert alpha.min() > 0.0 and alpha.max() < 1.0
        assert alpha.std() > 0  # a per-pixel multiplier, not a constant
        torch.testing.assert_close(out, x * alpha)


def test_smp_unet_builds_without_weights() -> None:
    model = build_model(_unet_spec(in_channels=10))
    assert isinstance(model, smp.Unet)
    assert any("SCSE" in type(m).__name__ for m in model.decoder.modules())
    assert model.encoder._conv_stem.in_channels == 10
    assert count_parameters(model) > 5_000_000


@pytest.mark.parametrize("name", list(ModelName))
def test_backward_pass(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name=name, in_channels=4, widths=(8, 16, 32))).train()
    logits = model(torch.randn(2, 4, 32, 32))
    target = (torch.rand(2, 1, 32, 32) > 0.5).float()
    nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    if name == "attention-unet":
        assert all(g is not None for g in grads.values())
    # smp's efficientnet encoder keeps an unused _conv_head, and the last decoder block an
    # unused skip attention: those get no gradient, in smp itself too.


def test_count_parameters() -> None:
    model = AttentionUNet(in_channels=2, widths=(4, 8, 16))
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == total
    model.head.requires_grad_(False)
    assert count_parameters(model) == total
    assert count_parameters(model, trainable_only=True) == total - 4 - 1


# ---------------------------------------------------------------------------- spec


def test_spec_round_trips_through_a_dict_and_json() -> None:
    spec = ModelSpec(name="unet", in_channels=30, encoder="resnet18", encoder_weights="/w/enc.pt")
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    default = ModelSpec()
    assert ModelSpec.from_dict(default.to_dict()) == default
    assert ModelSpec.from_dict({}) == default
    assert default.to_dict()["widths"] == [40, 80, 160]


def test_spec_holds_members_and_saves_plain_text() -> None:
    spec = ModelSpec(name="resnet3d", in_channels=4, encoder=VideoResNet.MC3_18)
    assert spec.name is ModelName.RESNET3D and type(spec.encoder) is str
    d = spec.to_dict()
    assert (type(d["name"]), d["name"], d["encoder"]) == (str, "resnet3d", "mc3_18")
    assert ModelSpec.from_dict(d) == spec and ModelSpec.from_dict(d).name is ModelName.RESNET3D
    # the networks accept exactly the video ResNets the spec does
    assert tuple(VideoResNet) == VIDEO_RESNETS


def test_spec_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="did you mean 'in_channels'"):
        ModelSpec.from_dict({"in_chanels": 10})
    with pytest.raises(ConfigError, match="mapping"):
        ModelSpec.from_dict([("name", "unet")])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "atention-unet"}, "did you mean 'attention-unet'"),
        ({"in_channels": 0}, "in_channels"),
        ({"widths": (40, 80)}, "widths"),
        ({"dropout_decoder": 1.0}, "dropout_decoder"),
        ({"encoder_weights": "imagenet"}, "need an smp encoder"),
        ({"name": "unet", "encoder_weights": ""}, "encoder_weights"),
    ],
)
def test_spec_rejects_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelSpec(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("typo", ["efficientnet-b9x", "efficentnet-b0"])
def test_unknown_encoder_suggests_the_closest(typo: str) -> None:
    with pytest.raises(ConfigError, match="did you mean 'efficientnet-b0'"):
        _unet_spec(encoder=typo)


def test_timm_universal_encoder_names_are_checked() -> None:
    assert _unet_spec(encoder="tu-resnet18").encoder == "tu-resnet18"
    with pytest.raises(ConfigError, match="did you mean 'tu-resnet18'"):
        _unet_spec(encoder="tu-resnett18")


# ---------------------------------------------------------------------------- local weights


def _saved_encoder(tmp_path, encoder: str = "efficientnet-b0", wrap: bool = False):
    torch.manual_seed(1)
    source = smp.Unet(encoder, encoder_weights=None, in_channels=3, classes=1)
    state = source.encoder.state_dict()
    path = tmp_path / "encoder.pt"
    if wrap:  # a training checkpoint holding a whole model
        full = {f"encoder.{k}": v for k, v in state.items()}
        full["decoder.something.weight"] = torch.zeros(1)
        torch.save({"state_dict": full, "epoch": 3}, path)
    else:
        torch.save(state, path)
    return path, state


@pytest.mark.parametrize("wrap", [False, True])
def test_local_encoder_weights_load_and_adapt_to_k(tmp_path, wrap: bool) -> None:
    path, saved = _saved_encoder(tmp_path, wrap=wrap)
    model = build_model(_unet_spec(in_channels=10, encoder_weights=str(path)))
    loaded = model.encoder.state_dict()
    assert loaded.keys() == saved.keys()
    first = "_conv_stem.weight"
    for key, value in saved.items():
        if key != first:
            assert torch.equal(loaded[key], value), key
    # smp's pretrained adaptation: the RGB kernel tiled over the k layers, scaled by 3/k
    expected = torch.cat([saved[first]] * 4, dim=1)[:, :10] * (3 / 10)
    assert loaded[first].shape == (32, 10, 3, 3)
    torch.testing.assert_close(loaded[first], expected)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 10, 32, 32)).shape == (1, 1, 32, 32)


def test_missing_weights_file(tmp_path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(InputNotFoundError, match="nope.pt"):
        build_model(_unet_spec(encoder_weights=str(missing)))


def test_weights_of_another_encoder_are_named(tmp_path) -> None:
    path, _ = _saved_encoder(tmp_path, encoder="resnet18")
    with pytest.raises(ConfigError) as err:
        build_model(_unet_spec(encoder_weights=str(path)))
    message = str(err.value)
    assert str(path) in message and "efficientnet-b0" in message
    assert "missing" in message and "_conv_stem.weight" in message
    assert "unexpected" in message and "conv1.weight" in message


# ---------------------------------------------------------------------------- imagenet offline


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return constants


def test_imagenet_offline_fails_fast_with_hf_hub_offline(empty_hub_cache, monkeypatch) -> None:
    # Set after huggingface_hub was imported: build_model must still honour it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = empty_hub_cache.HF_HUB_OFFLINE
    start = time.monotonic()
    with deadline(60), pytest.raises(OfflineError) as err:
        build_model(_unet_spec(encoder_weights="imagenet"))
    assert time.monotonic() - start < 10
    assert str(err.value) == OFFLINE_MESSAGE
    assert before == empty_hub_cache.HF_HUB_OFFLINE


def test_imagenet_unreachable_hub_fails_fast(empty_hub_cache, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(empty_hub_cache, "HF_HUB_OFFLINE", False)
    # the discard port: nothing listens, so the connection is refused at once
    monkeypatch.setattr(empty_hub_cache, "ENDPOINT", "http://127.0.0.1:9")
    assert weights._hub_reachable(timeout_s=2.0) is False
    start = time.monotonic()
    with deadline(60), pytest.raises(OfflineError, match="offline"):
        build_model(_unet_spec(encoder_weights="imagenet"))
    assert time.monotonic() - start < 10
    assert empty_hub_cache.HF_HUB_OFFLINE is False  # offline mode was only temporary


def test_encoder_without_imagenet_weights(monkeypatch) -> None:
    monkeypatch.setitem(
        smp.encoders.encoders["resnet18"],
        "pretrained_settings",
        {"ssl": {"repo_id": "x", "revision": "y"}},
    )
    with pytest.raises(ConfigError, match="no imagenet weights.*ssl"):
        build_model(_unet_spec(encoder="resnet18", encoder_weights="imagenet"))


def test_restoring_a_checkpoint_needs_no_weights(tmp_path) -> None:
    spec = _unet_spec(in_channels=2, encoder_weights=str(tmp_path / "gone.pt"))
    model = build_model(dataclasses.replace(spec, encoder_weights="none"))
    assert isinstance(model, smp.Unet)
