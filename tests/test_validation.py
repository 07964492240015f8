"""commlib.validation: every argument check of the library, its messages and its edge cases."""

import math

import pytest

from commlib.validation import flag, fraction, integer, number, one_of


@pytest.mark.parametrize("value", [True, 1.0, "3", None, 0, 9])
def test_integer_refuses_bools_floats_and_out_of_range(value):
    with pytest.raises(ValueError, match=r"bits must be an integer in \[1, 8\], got"):
        integer("bits", value, 1, 8)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "0.5", None])
def test_number_refuses_nan_inf_bools_and_text(value):
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\), got"):
        number("momentum", value, low=0, high=1, high_open=True)


def test_number_bounds_open_and_closed():
    assert number("lr", 0, low=0) == 0.0
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got 0"):
        number("lr", 0, low=0, low_open=True)
    assert number("timeout", math.inf, low=0, low_open=True, finite=False) == math.inf
    with pytest.raises(ValueError, match=r"timeout must be a number > 0 \(seconds\), got -1"):
        number("timeout", -1, low=0, low_open=True, finite=False, why=" (seconds)")
    assert fraction("density", 1) == 1.0
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\], got 0"):
        fraction("density", 0)


def test_flag_and_one_of_compare_types():
    assert flag("exact", False) is False
    with pytest.raises(ValueError, match="exact must be True or False, got 1"):
        flag("exact", 1)
    assert one_of("hierarchical", True, ("auto", True, False)) is True
    for bad in (1, 0, "Auto"):  # 1 == True, but 1 is not an allowed value
        with pytest.raises(ValueError, match=r"hierarchical must be one of \('auto', True, False\)"):
            one_of("hierarchical", bad, ("auto", True, False))
    assert one_of("finiteness", None, (None, "host", "device")) is None
