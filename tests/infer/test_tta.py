from __future__ import annotations

import numpy as np
import pytest
import torch

from inkpipe.infer.tta import TtaMode, ensemble, with_tta
from inkpipe.numerics.blending import sliding_window_predict
from inkpipe.pipeline.errors import ConfigError

MODES = list(TtaMode)


def pointwise(batch: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(2 * batch.mean(dim=1) - 0.5)


def x_gradient(batch: torch.Tensor) -> torch.Tensor:
    """Ignore the pixels, return each pixel's column index: not flip-equivariant."""
    b, _, h, w = batch.shape
    return torch.arange(w, dtype=torch.float32).expand(b, h, w).clone()


def cumulative(batch: torch.Tensor) -> torch.Tensor:
    """Depends on pixel order along both axes: equivariant to nothing."""
    return batch.sum(dim=1).cumsum(dim=-1).cumsum(dim=-2) * torch.linspace(1, 2, batch.shape[-1])


def images(shape: tuple[int, ...] = (2, 3, 6, 6), seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", MODES)
def test_equivariant_predictor_is_unchanged(mode: str) -> None:
    x = images()
    torch.testing.assert_close(with_tta(pointwise, mode)(x), pointwise(x))  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["flips", "flips+rot90"])
def test_non_equivariant_predictor_is_symmetrised(mode: str) -> None:
    x = images()
    out = with_tta(x_gradient, mode)(x)  # type: ignore[arg-type]
    assert out.shape == (2, 6, 6)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))  # mean of x and 5 - x


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    flips = [x, x.flip(-1), x.flip(-2), x.flip(-1, -2)]
    return flips + [torch.rot90(f, 1, dims=(-2, -1)) for f in flips]


@pytest.mark.parametrize(("mode", "n_symmetries"), [("flips", 4), ("flips+rot90", 8)])
def test_tta_output_is_equivariant(mode: str, n_symmetries: int) -> None:
    tta = with_tta(cumulative, mode)  # type: ignore[arg-type]
    x = images((1, 2, 5, 5), seed=1)
    base = tta(x)
    for transformed_in, transformed_out in list(zip(dihedral(x), dihedral(base), strict=True))[
        :n_symmetries
    ]:
        torch.testing.assert_close(tta(transformed_in), transformed_out)
    # the raw predictor is not equivariant, so the check above is not vacuous
    assert not torch.allclose(cumulative(x.flip(-1)), cumulative(x).flip(-1))


def test_tta_identity_and_calls() -> None:
    assert with_tta(pointwise, "none") is pointwise
    calls: list[tuple[int, ...]] = []

    def spy(batch: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(batch.shape))
        return batch[:, 0]

    with_tta(spy, "flips+rot90")(images((1, 1, 4, 6)))
    assert calls == [(1, 1, 4, 6)] * 4 + [(1, 1, 6, 4)] * 4  # rotations swap H and W


def test_unknown_mode_suggests_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'flips'"):
        with_tta(pointwise, "flip")  # type: ignore[arg-type]


def test_channel_output_and_numpy() -> None:
    x = images()
    out = with_tta(lambda b: x_gradient(b)[:, None], "flips")(x)
    assert out.shape == (2, 1, 6, 6)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))
    xn = x.numpy()
    out_np = with_tta(lambda b: np.cumsum(b.sum(axis=1), axis=-1), "flips+rot90")(xn)
    assert isinstance(out_np, np.ndarray)
    expected = with_tta(lambda b: b.sum(dim=1).cumsum(dim=-1), "flips+rot90")(x)
    np.testing.assert_allclose(out_np, expected.numpy(), rtol=1e-5)


def test_ensemble_averages() -> None:
    x = images()
    ones = lambda b: torch.ones(b.shape[0], *b.shape[2:])  # noqa: E731
    threes = lambda b: torch.full((b.shape[0], *b.shape[2:]), 3.0)  # noqa: E731
    torch.testing.assert_close(ensemble([ones, threes])(x), torch.full((2, 6, 6), 2.0))
    assert ensemble([ones]) is ones
    with pytest.raises(ConfigError, match="at least one predictor"):
        ensemble([])
    # ensembles and TTA compose
    torch.testing.assert_close(
        ensemble([with_tta(x_gradient, "flips"), threes])(x),  # type: ignore[arg-type]
        torch.full((2, 6, 6), 2.75),
    )


def test_tta_on_numpy_predictor_inside_blending() -> None:
    image = images((2, 11, 9), seed=2).numpy()

    def numpy_pointwise(batch: np.ndarray) -> np.ndarray:
        return pointwise(torch.from_numpy(batch)).numpy()

    predictor = with_tta(numpy_pointwise, "flips")
    out = sliding_window_predict(image, predictor, 4, 3)
    expected = pointwise(torch.from_numpy(image)[None])[0].numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)
