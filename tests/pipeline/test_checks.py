import math

import numpy as np
import pytest

from inkpipe.pipeline.checks import check_int, check_number, is_int, is_number, repeated
from inkpipe.pipeline.errors import ConfigError


def test_bools_are_not_numbers_numpy_scalars_are() -> None:
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0)
    assert is_number(0.5) and is_number(np.float32(0.5)) and is_number(np.int16(2))
    assert not is_number(True) and not is_number("0.5") and not is_number(None)
    assert not is_number(math.nan) and not is_number(math.inf)


def test_check_int_returns_an_int_or_says_what_was_expected() -> None:
    value = check_int("tile_px", np.int32(7), 1)
    assert value == 7 and type(value) is int
    assert check_int("layers", 8, 8, maximum=1000) == 8
    with pytest.raises(ConfigError) as err:
        check_int("tile_px", 0, 1, "e.g. 224")
    assert str(err.value) == "tile_px must be an integer >= 1, got 0; e.g. 224"
    with pytest.raises(ConfigError, match=r"^layers must be an integer in \[8, 1000\], got 4$"):
        check_int("layers", 4, 8, maximum=1000)
    for bad in (True, 2.0, "2"):
        with pytest.raises(ConfigError, match="must be an integer"):
            check_int("n", bad, 0)


@pytest.mark.parametrize(
    ("bounds", "good", "bad", "message"),
    [
        ({"low": 0, "high": 1}, [0, 1, 0.5], [-0.1, 1.5], "x must be in [0, 1], got {}"),
        ({"low": 0, "high": 1, "high_open": True}, [0], [1.0], "x must be in [0, 1), got {}"),
        ({"low": 0, "high": 1, "low_open": True}, [1], [0], "x must be in (0, 1], got {}"),
        ({"low": 0, "low_open": True}, [1e9], [0], "x must be > 0, got {}"),
        ({"low": 0}, [0], [-1], "x must be >= 0, got {}"),
        ({"high": 0.95}, [-3], [0.96], "x must be <= 0.95, got {}"),
        ({}, [-3.5], [math.inf, math.nan, True, "1"], "x must be a number, got {}"),
    ],
)
def test_check_number_bounds(bounds: dict, good: list, bad: list, message: str) -> None:
    for value in good:
        assert check_number("x", value, **bounds) == float(value)
    for value in bad:
        with pytest.raises(ConfigError) as err:
            check_number("x", value, **bounds)
        assert str(err.value) == message.format(repr(value))


def test_check_number_kind_and_hint() -> None:
    with pytest.raises(ConfigError) as err:
        check_number("ink_contrast", -1, 0.0, 10.0, kind="a number", hint="0.8 is the default")
    assert str(err.value) == "ink_contrast must be a number in [0, 10], got -1; 0.8 is the default"


def test_repeated() -> None:
    assert repeated(["b", "a", "b", "c", "a", "b"]) == ["a", "b"]
    assert repeated(iter(["1", "2"])) == []
