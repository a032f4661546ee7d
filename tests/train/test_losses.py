from __future__ import annotations

import math
import pickle
import re

import pytest
import torch

from inkpipe.pipeline.errors import ConfigError
from inkpipe.train.losses import LossName, LossSpec, build_loss, per_sample_loss


def _t(values: list[list[float]]) -> torch.Tensor:
    """A (1, 1, H, W) tensor from rows."""
    return torch.tensor(values, dtype=torch.float32)[None, None]


def _sp(x: float) -> float:
    """softplus(x) = log(1 + e^x): the BCE of logit x against target 0 (of -x against 1)."""
    return math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


LOGITS = _t([[0.0, 2.0], [-1.0, 3.0]])
TARGET = _t([[1.0, 0.0], [0.0, 1.0]])
# per-pixel BCE: ln 2, softplus(2), softplus(-1), softplus(-3)
BCE = [math.log(2), _sp(2.0), _sp(-1.0), _sp(-3.0)]


def _dice(p: list[float], t: list[float]) -> float:
    inter = sum(a * b for a, b in zip(p, t, strict=True))
    return 1 - (2 * inter + 1) / (sum(p) + sum(t) + 1)


P = [_sig(x) for x in (0.0, 2.0, -1.0, 3.0)]
T = [1.0, 0.0, 0.0, 1.0]


def test_bce_by_hand() -> None:
    loss = build_loss(LossSpec(name="bce"))(LOGITS, TARGET)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(sum(BCE) / 4, rel=1e-6)


def test_bce_of_zero_logits_is_ln2() -> None:
    loss = build_loss(LossSpec(name="bce"))(torch.zeros(3, 1, 4, 4), torch.ones(3, 1, 4, 4))
    assert loss.item() == pytest.approx(math.log(2))


def test_focal_by_hand() -> None:
    alpha, gamma = 0.25, 2.0
    expected = []
    for x, t, ce in zip((0.0, 2.0, -1.0, 3.0), T, BCE, strict=True):
        p = _sig(x)
        p_t = p if t == 1 else 1 - p
        alpha_t = alpha if t == 1 else 1 - alpha
        expected.append(alpha_t * (1 - p_t) ** gamma * ce)
    loss = build_loss(LossSpec(name="focal", focal_alpha=alpha, focal_gamma=gamma))
    assert loss(LOGITS, TARGET).item() == pytest.approx(sum(expected) / 4, rel=1e-6)


def test_dice_by_hand() -> None:
    loss = build_loss(LossSpec(name="dice"))(LOGITS, TARGET)
    assert loss.item() == pytest.approx(_dice(P, T), rel=1e-6)


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_combination_weights(w: float) -> None:
    loss = build_loss(LossSpec(name="bce+dice", dice_weight=w))(LOGITS, TARGET)
    expected = (1 - w) * sum(BCE) / 4 + w * _dice(P, T)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    focal = build_loss(LossSpec(name="focal"))(LOGITS, TARGET).item()
    combo = build_loss(LossSpec(name="focal+dice", dice_weight=w))(LOGITS, TARGET)
    assert combo.item() == pytest.approx((1 - w) * focal + w * _dice(P, T), rel=1e-6)


@pytest.mark.parametrize("name", list(LossName))
def test_valid_mask_excludes_pixels(name: str) -> None:
    spec = LossSpec(name=name)
    valid = _t([[1.0, 0.0], [1.0, 1.0]])
    masked = build_loss(spec)(LOGITS, TARGET, valid)
    # the excluded pixel (logit 2, target 0) can hold anything
    other = LOGITS.clone()
    other[..., 0, 1] = -50.0
    assert build_loss(spec)(other, TARGET, valid).item() == pytest.approx(masked.item())
    # and equals the loss computed without that pixel at all
    kept = LOGITS.flatten()[[0, 2, 3]].reshape(1, 1, 1, 3)
    kept_t = TARGET.flatten()[[0, 2, 3]].reshape(1, 1, 1, 3)
    assert masked.item() == pytest.approx(build_loss(spec)(kept, kept_t).item(), rel=1e-6)


def test_valid_mask_broadcasts_and_empty_mask_gives_zero_pixel_loss() -> None:
    logits = torch.randn(2, 1, 4, 4)
    target = (torch.rand(2, 1, 4, 4) > 0.5).float()
    ones = build_loss(LossSpec(name="bce"))(logits, target, torch.ones(1, 1, 4, 4))
    assert ones.item() == pytest.approx(build_loss(LossSpec(name="bce"))(logits, target).item())
    none = torch.zeros(2, 1, 4, 4)
    assert build_loss(LossSpec(name="bce"))(logits, target, none).item() == 0.0
    assert build_loss(LossSpec(name="dice"))(logits, target, none).item() == 0.0


def test_label_smoothing_changes_bce() -> None:
    s = 0.2
    plain = build_loss(LossSpec(name="bce"))(LOGITS, TARGET).item()
    smooth = build_loss(LossSpec(name="bce", label_smoothing=s))(LOGITS, TARGET).item()
    assert smooth != pytest.approx(plain)
    soft = [t * (1 - s) + 0.5 * s for t in T]
    expected = [
        -(y * math.log(_sig(x)) + (1 - y) * math.log(1 - _sig(x)))
        for x, y in zip((0.0, 2.0, -1.0, 3.0), soft, strict=True)
    ]
    assert smooth == pytest.approx(sum(expected) / 4, rel=1e-6)
    # dice ignores smoothing
    dice = build_loss(LossSpec(name="dice", label_smoothing=s))(LOGITS, TARGET).item()
    assert dice == pytest.approx(_dice(P, T), rel=1e-6)


def test_focal_is_at_most_bce_and_much_smaller_on_easy_pixels() -> None:
    easy_logits = _t([[6.0, -6.0], [4.0, -5.0]])
    easy_target = _t([[1.0, 0.0], [1.0, 0.0]])
    bce = build_loss(LossSpec(name="bce"))(easy_logits, easy_target).item()
    focal = build_loss(LossSpec(name="focal"))(easy_logits, easy_target).item()
    assert focal < bce * 1e-3
    logits = torch.randn(4, 1, 8, 8) * 3
    target = (torch.rand(4, 1, 8, 8) > 0.5).float()
    for alpha in (0.25, 0.5):
        spec = LossSpec(name="focal", focal_alpha=alpha)
        assert (
            per_sample_loss(spec, logits, target)
            <= per_sample_loss(LossSpec("bce"), logits, target)
        ).all()


@pytest.mark.parametrize("name", list(LossName))
def test_per_sample_loss(name: str) -> None:
    torch.manual_seed(0)
    spec = LossSpec(name=name)
    logits = torch.randn(3, 1, 8, 8)
    target = (torch.rand(3, 1, 8, 8) > 0.7).float()
    valid = (torch.rand(3, 1, 8, 8) > 0.2).float()
    per = per_sample_loss(spec, logits, target, valid)
    assert per.shape == (3,)
    for i in range(3):
        alone = build_loss(spec)(logits[i : i + 1], target[i : i + 1], valid[i : i + 1])
        assert per[i].item() == pytest.approx(alone.item(), rel=1e-5)
    # a confidently wrong sample is the hardest
    logits[1] = torch.where(target[1] > 0, -8.0, 8.0)
    assert per_sample_loss(spec, logits, target, valid).argmax().item() == 1


def test_per_sample_loss_of_empty_sample_is_zero() -> None:
    logits = torch.randn(2, 1, 4, 4)
    valid = torch.ones(2, 1, 4, 4)
    valid[0] = 0
    per = per_sample_loss(LossSpec(name="bce"), logits, torch.zeros_like(logits), valid)
    assert per[0].item() == 0.0 and per[1].item() > 0


@pytest.mark.parametrize("name", list(LossName))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_for_extreme_logits(name: str, dtype: torch.dtype) -> None:
    logits = _t([[100.0, -100.0], [100.0, -100.0]]).to(dtype).requires_grad_()
    target = _t([[1.0, 0.0], [0.0, 1.0]])  # two right, two confidently wrong
    for gamma in (0.5, 2.0):
        spec = LossSpec(name=name, focal_gamma=gamma, label_smoothing=0.1)
        loss = build_loss(spec)(logits, target)
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad).all()
        assert torch.isfinite(per_sample_loss(spec, logits, target)).all()
    right = build_loss(LossSpec(name="bce"))(_t([[100.0, -100.0]]), _t([[1.0, 0.0]]))
    assert right.item() == pytest.approx(0.0, abs=1e-6)
    wrong = build_loss(LossSpec(name="bce"))(_t([[100.0]]), _t([[0.0]]))
    assert wrong.item() == pytest.approx(100.0)


def test_loss_under_autocast_matches_float32() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    loss = build_loss(LossSpec(name="focal+dice"))
    reference = loss(logits, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(logits.bfloat16(), target)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(reference.item(), rel=2e-2)


def test_loss_is_picklable() -> None:
    loss = pickle.loads(pickle.dumps(build_loss(LossSpec(name="dice"))))
    assert loss(LOGITS, TARGET).item() == pytest.approx(_dice(P, T), rel=1e-6)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="same shape"):
        build_loss(LossSpec())(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "bce+dise"}, re.escape("did you mean 'bce+dice'")),
        ({"name": "focall"}, "did you mean 'focal'"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"dice_weight": 1.5}, "dice_weight"),
        ({"focal_alpha": -0.1}, "focal_alpha"),
        ({"focal_gamma": -1.0}, "focal_gamma"),
    ],
)
def test_spec_rejects_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LossSpec(**kwargs)  # type: ignore[arg-type]
