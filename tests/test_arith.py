"""The vectorized arithmetic against a literal, scalar transcription of gemmlowp."""

import numpy as np
import pytest

from npugen.arith import quantize_multiplier, requantize, rounding_divide_by_pot
from npugen.arith import rounding_doubling_high_mul as high_mul


def reference_high_mul(a: int, b: int) -> int:
    # gemmlowp SaturatingRoundingDoublingHighMul(int32, int32)
    if a == b == -(1 << 31):
        return (1 << 31) - 1
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    total = ab + nudge
    return int(total / (1 << 31)) if abs(total) < (1 << 52) else (
        total // (1 << 31) if total >= 0 else -((-total) // (1 << 31)))


def reference_divide_by_pot(x: int, exponent: int) -> int:
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


EDGE = [-(1 << 31), -(1 << 31) + 1, -1, 0, 1, (1 << 31) - 1, 1 << 30, -(1 << 30), 3, -3]


def test_high_mul_matches_reference():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.integers(-(1 << 31), 1 << 31, 3000), np.repeat(EDGE, len(EDGE))])
    b = np.concatenate([rng.integers(-(1 << 31), 1 << 31, 3000), np.tile(EDGE, len(EDGE))])
    expected = [reference_high_mul(int(x), int(y)) for x, y in zip(a, b, strict=True)]
    assert high_mul(a, b).tolist() == expected


def test_divide_by_pot_rounds_half_away_from_zero():
    assert rounding_divide_by_pot(np.array([5, -5, 6, -6, 7, -7]), 1).tolist() == \
        [3, -3, 3, -3, 4, -4]
    rng = np.random.default_rng(1)
    x = rng.integers(-(1 << 31), 1 << 31, 2000)
    s = rng.integers(0, 32, 2000)
    expected = [reference_divide_by_pot(int(v), int(e)) for v, e in zip(x, s, strict=True)]
    assert rounding_divide_by_pot(x, s).tolist() == expected


def test_ties_to_even_rounds_halves_to_the_even_result():
    """With ties_to_even the last rounding takes exact halves to the even result (Python's
    round, exactly, with Fractions) and rounds everything else as before."""
    from fractions import Fraction

    assert rounding_divide_by_pot(np.array([5, -5, 6, -6, 7, -7, 3, -3]), 1, 1).tolist() == \
        [2, -2, 3, -3, 4, -4, 2, -2]
    assert rounding_divide_by_pot(np.array([7, -7]), 0, 1).tolist() == [7, -7]
    rng = np.random.default_rng(3)
    x = rng.integers(-5000, 5000, 4000)
    s = rng.integers(0, 4, 4000)
    # m = 2**30 and 2**29: x·m / 2**(31+s) is x / 2**(s+1) or x / 2**(s+2), often a half.
    m = np.where(rng.random(4000) < 0.5, 1 << 30, 1 << 29)
    exact = [Fraction(int(a) * int(b), 1 << (31 + int(c))) for a, b, c in zip(x, m, s,
                                                                             strict=True)]
    wide = dict(accumulator_width=32, output_width=40)
    single = requantize(x, 0, m, s, 0, -(1 << 40), 1 << 40, rounding="single_even", **wide)
    assert single.tolist() == [round(value) for value in exact]
    halves = np.array([value.denominator == 2 for value in exact])
    assert halves.mean() > 0.1
    up = requantize(x, 0, m, s, 0, -(1 << 40), 1 << 40, rounding="single", **wide)
    assert np.array_equal(single[~halves], up[~halves]) and np.any(single != up)
    # Double: the high multiply by 2**30 halves x exactly where x is even; the rounding
    # shift then takes its halves to even.
    even_x = 2 * x
    double = requantize(even_x, 0, 1 << 30, s, 0, -(1 << 40), 1 << 40,
                        rounding="double_even", **wide)
    assert double.tolist() == [round(Fraction(int(a), 1 << int(c))) for a, c in zip(x, s,
                                                                                   strict=True)]


def test_single_rounding_rounds_the_exact_product_once():
    """single: round(x·m / 2**(31+s)) half up, computed exactly with Python integers;
    double rounding differs from it on some inputs (that is why both exist)."""
    rng = np.random.default_rng(7)
    x = rng.integers(-(1 << 31), 1 << 31, 20000)
    m = rng.integers(1 << 30, 1 << 31, 20000)
    s = rng.integers(0, 12, 20000)
    exact = [(int(a) * int(b) + (1 << (30 + int(c)))) >> (31 + int(c))
             for a, b, c in zip(x, m, s, strict=True)]
    single = requantize(x, 0, m, s, 0, -(1 << 40), 1 << 40, accumulator_width=32,
                        output_width=40, rounding="single")
    double = requantize(x, 0, m, s, 0, -(1 << 40), 1 << 40, accumulator_width=32,
                        output_width=40)
    assert np.array_equal(single, exact)
    assert 0 < np.count_nonzero(single != double) < 0.1 * len(x)
    assert np.abs(single - double).max() == 1


def test_requantize_saturates_and_clamps():
    acc = np.array([1 << 20, -(1 << 20), 0, 100])
    out = requantize(acc, 0, (1 << 31) - 1, 0, 0, -128, 127, accumulator_width=32,
                     output_width=8)
    assert out.tolist() == [127, -128, 0, 100]
    relu6 = requantize(np.array([-50, 3, 50]), 0, (1 << 31) - 1, 0, -10, -10, -4,
                       accumulator_width=32, output_width=8)
    assert relu6.tolist() == [-10, -7, -4]


def test_bias_wraps_at_accumulator_width():
    out = requantize(np.array([(1 << 15) - 1]), 1, (1 << 31) - 1, 0, 0, -(1 << 15),
                     (1 << 15), accumulator_width=16, output_width=16)
    assert out.tolist() == [-(1 << 15)]


@pytest.mark.parametrize("scale", [0.5, 0.25, 1e-3, 0.7071, 2.0 ** -31, 0.999999])
def test_quantize_multiplier(scale):
    multiplier, shift = quantize_multiplier(scale)
    assert (1 << 30) <= multiplier < (1 << 31)
    assert abs(multiplier * 2.0 ** (-31 - shift) - scale) <= scale * 2 ** -30


def test_quantize_multiplier_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"must be in \(0, 1\), not 1.5"):
        quantize_multiplier(1.5)
