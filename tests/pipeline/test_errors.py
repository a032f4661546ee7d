from enum import StrEnum

import pytest

from inkpipe.pipeline.errors import ConfigError, check_choice


class Colour(StrEnum):
    RED = "red"
    DARK_BLUE = "dark-blue"


def test_check_choice_turns_a_string_into_the_member() -> None:
    value = check_choice("colour", "dark-blue", Colour)
    assert value is Colour.DARK_BLUE
    assert check_choice("colour", Colour.RED, Colour) is Colour.RED
    assert check_choice("colour", "red", ("red", "blue")) == "red"


@pytest.mark.parametrize("choices", [Colour, ("red", "dark-blue")])
def test_check_choice_names_the_closest_and_every_choice(choices: object) -> None:
    with pytest.raises(ConfigError) as err:
        check_choice("colour", "dark-bleu", choices)  # type: ignore[call-overload]
    expected = "unknown colour 'dark-bleu'; did you mean 'dark-blue'? (choose from red, dark-blue)"
    assert str(err.value) == expected
    for bad in (3, None, "RED"):
        with pytest.raises(ConfigError, match=f"unknown colour '{bad}'"):
            check_choice("colour", bad, Colour)
