"""Every option type at, just inside and just outside each of its bounds, so that flipping
any comparison of the validation (`>` to `>=`, `<` to `<=`, a dropped type check) fails
a test. Through `validate` and through `Model.resolve_options` (what the server calls)."""

from __future__ import annotations

import math

import pytest

from dlserver.model import Bool, Button, Choice, Float, Int, Model, OptionError, String

INT = Int("count", default=3, min=1, max=9)
FLOAT = Float("gain", default=0.5, min=-1.5, max=2.25)
UNBOUNDED_INT = Int("anything")
UNBOUNDED_FLOAT = Float("anything_f")
MIN_ONLY = Float("positive", default=1.0, min=0.0)
MAX_ONLY = Int("small", default=0, max=0)
STRING = String("label", default="", max_length=4)
CHOICE = Choice("mode", choices=("a", "b", "c"))
BOOL = Bool("flag")
BUTTON = Button("press")


class Limits(Model):
    name = "limits"
    uses_torch = False
    options = (INT, FLOAT, UNBOUNDED_INT, UNBOUNDED_FLOAT, MIN_ONLY, MAX_ONLY, STRING, CHOICE,
               BOOL, BUTTON)


def accepted(option, value):
    got = option.validate(value)
    via_model = Limits.resolve_options({option.name: value})[option.name]
    assert got == via_model and type(got) is type(via_model)
    return got


def refused(option, value, fragment: str) -> None:
    with pytest.raises(OptionError, match=fragment):
        option.validate(value)
    with pytest.raises(OptionError, match=fragment):
        Limits.resolve_options({option.name: value})


# --- Int ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1, 2, 8, 9, 1.0, 9.0])  # at and just inside each bound
def test_int_at_and_inside_its_bounds(value) -> None:
    got = accepted(INT, value)
    assert got == value and type(got) is int


@pytest.mark.parametrize("value, fragment", [
    (0, "below the minimum 1"), (-1, "below the minimum 1"), (0.0, "below the minimum 1"),
    (10, "above the maximum 9"), (11, "above the maximum 9"), (10.0, "above the maximum 9"),
])
def test_int_just_outside_its_bounds(value, fragment) -> None:
    refused(INT, value, fragment)


@pytest.mark.parametrize("value", [True, False, 1.5, 8.999999, "3", None, [3], float("nan"),
                                   float("inf")])
def test_int_refuses_what_is_not_an_integer(value) -> None:
    refused(INT, value, "is not an integer")


def test_int_without_bounds_and_with_one_bound() -> None:
    for value in (-(2 ** 63), 0, 2 ** 63):
        assert accepted(UNBOUNDED_INT, value) == value
    assert accepted(MAX_ONLY, 0) == 0 and accepted(MAX_ONLY, -10 ** 9) == -10 ** 9
    refused(MAX_ONLY, 1, "above the maximum 0")


# --- Float ----------------------------------------------------------------------------------

BELOW_MIN = math.nextafter(-1.5, -math.inf)
ABOVE_MAX = math.nextafter(2.25, math.inf)


@pytest.mark.parametrize("value", [-1.5, math.nextafter(-1.5, 0.0), 0.0, 1,
                                   math.nextafter(2.25, 0.0), 2.25, 2])
def test_float_at_and_inside_its_bounds(value) -> None:
    got = accepted(FLOAT, value)
    assert got == value and type(got) is float


@pytest.mark.parametrize("value, fragment", [
    (BELOW_MIN, "below the minimum -1.5"), (-2, "below the minimum -1.5"),
    (ABOVE_MAX, "above the maximum 2.25"), (3, "above the maximum 2.25"),
])
def test_float_just_outside_its_bounds(value, fragment) -> None:
    refused(FLOAT, value, fragment)


@pytest.mark.parametrize("option", [FLOAT, UNBOUNDED_FLOAT, MIN_ONLY])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_float_refuses_nan_and_infinity_with_or_without_bounds(option, value) -> None:
    refused(option, value, "is not a finite number")


@pytest.mark.parametrize("value", [True, False, "1.0", None, [1.0]])
def test_float_refuses_what_is_not_a_number(value) -> None:
    refused(FLOAT, value, "is not a number")


def test_float_with_one_bound() -> None:
    assert accepted(MIN_ONLY, 0.0) == 0.0 and accepted(MIN_ONLY, 1e300) == 1e300
    refused(MIN_ONLY, -5e-324, "below the minimum 0.0")  # the smallest negative float
    assert accepted(UNBOUNDED_FLOAT, -1e300) == -1e300


# --- String, Choice, Bool, Button --------------------------------------------------------------

@pytest.mark.parametrize("value", ["", "a", "abc", "abcd", "日本語x"])  # up to max_length
def test_string_up_to_its_length(value) -> None:
    assert accepted(STRING, value) == value


@pytest.mark.parametrize("value", ["abcde", "日本語xy"])
def test_string_one_character_too_long(value) -> None:
    refused(STRING, value, "longer than 4 characters")


@pytest.mark.parametrize("value", [None, 1, b"ab", ["a"]])
def test_string_refuses_what_is_not_a_string(value) -> None:
    refused(STRING, value, "is not a string")


@pytest.mark.parametrize("value", ["a", "b", "c"])
def test_choice_accepts_each_choice(value) -> None:
    assert accepted(CHOICE, value) == value


@pytest.mark.parametrize("value", ["A", "d", "", " a", "a ", None, 0, ["a"]])
def test_choice_refuses_anything_else(value) -> None:
    refused(CHOICE, value, "is not one of 'a', 'b', 'c'")


@pytest.mark.parametrize("option, expected", [(BOOL, "true or false"),
                                              (BUTTON, r"true or false \(pressed or not\)")])
def test_bool_and_button_accept_only_booleans(option, expected) -> None:
    assert accepted(option, True) is True and accepted(option, False) is False
    for value in (0, 1, 0.0, 1.0, "true", "false", None):
        refused(option, value, expected)


# --- declarations and defaults ------------------------------------------------------------------

def test_defaults_at_the_bounds_are_allowed_and_outside_refused() -> None:
    assert Int("a", default=1, min=1, max=9).default == 1
    assert Int("a", default=9, min=1, max=9).default == 9
    assert Float("b", default=2.25, min=-1.5, max=2.25).default == 2.25
    assert String("s", default="abcd", max_length=4).default == "abcd"
    with pytest.raises(OptionError, match="below the minimum"):
        Int("a", default=0, min=1, max=9)
    with pytest.raises(OptionError, match="above the maximum"):
        Float("b", default=ABOVE_MAX, max=2.25)
    with pytest.raises(OptionError, match="longer than 4"):
        String("s", default="abcde", max_length=4)
    with pytest.raises(OptionError, match="not one of"):
        Choice("c", default="z", choices=("a",))


def test_options_left_out_take_their_defaults() -> None:
    assert Limits.resolve_options({}) == {
        "count": 3, "gain": 0.5, "anything": 0, "anything_f": 0.0, "positive": 1.0,
        "small": 0, "label": "", "mode": "a", "flag": False, "press": False}
