"""One meaning of "an integer" and "a number" for every module that validates input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.checks import is_int, is_real


@pytest.mark.parametrize("value", [0, -3, 2**70, np.int64(5), np.uint8(7)])
def test_integers_of_python_and_numpy_are_integers(value):
    assert is_int(value) and is_real(value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 1.0, "3", None, [1]])
def test_bools_floats_and_strings_are_not_integers(value):
    assert not is_int(value)


@pytest.mark.parametrize("value", [0.5, -1e300, np.float32(0.25), 7])
def test_finite_numbers_are_numbers(value):
    assert is_real(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "0.5", None])
def test_nan_infinity_bools_and_strings_are_not_numbers(value):
    assert not is_real(value)
