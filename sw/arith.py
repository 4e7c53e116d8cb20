"""Integer arithmetic of the NPU, following the TFLite/gemmlowp reference.

All functions take and return ``int64`` NumPy arrays (or scalars) and are exact.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "wrap", "saturate", "rounding_doubling_high_mul", "rounding_divide_by_pot",
    "single_rounding_multiply", "requantize_raw", "ADD_LEFT_SHIFT", "ROUNDING_MODES",
    "requantize", "quantize_multiplier",
]

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


def wrap(values, width: int) -> np.ndarray:
    """Two's-complement wrap-around to ``width`` bits."""
    values = np.asarray(values, dtype=np.int64)
    half = np.int64(1) << np.int64(width - 1)
    return ((values + half) & ((half << 1) - 1)) - half


def saturate(values, width: int) -> np.ndarray:
    """Clamp to the range of a signed ``width``-bit integer, −2**(width−1) to
    2**(width−1) − 1."""
    values = np.asarray(values, dtype=np.int64)
    return np.clip(values, -(1 << (width - 1)), (1 << (width - 1)) - 1)


def rounding_doubling_high_mul(x, multiplier) -> np.ndarray:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int32 values."""
    x = np.asarray(x, dtype=np.int64)
    multiplier = np.asarray(multiplier, dtype=np.int64)
    product = x * multiplier
    nudge = np.where(product >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    total = product + nudge
    # C++ integer division truncates toward zero.
    quotient = np.where(total >= 0, total >> 31, -((-total) >> 31))
    overflow = (x == INT32_MIN) & (multiplier == INT32_MIN)
    return np.where(overflow, np.int64(INT32_MAX), quotient)


def rounding_divide_by_pot(x, shift, ties_to_even=0) -> np.ndarray:
    """gemmlowp ``RoundingDivideByPOT``: divide by 2**shift, rounding half away from 0; with
    ``ties_to_even``, halves to the even result instead."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    mask = (np.int64(1) << shift) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    floor = x >> shift
    # The half is 2**(shift−1); at shift 0 nothing is left to round (1 > remainder 0).
    tie = remainder == (mask >> 1) + 1
    even = np.asarray(ties_to_even, dtype=bool)
    return floor + np.where(even & tie, floor & 1, remainder > threshold)


def single_rounding_multiply(x, multiplier, shift, ties_to_even=0) -> np.ndarray:
    """TFLite's ``MultiplyByQuantizedMultiplier`` with TFLITE_SINGLE_ROUNDING:
    (x·multiplier + 2**(30+shift)) >> (31+shift), one rounding (half up), wrapped to 32 bits.
    With ``ties_to_even``, a product exactly halfway between two results rounds to the
    even one instead (ONNX's QuantizeLinear)."""
    x = np.asarray(x, dtype=np.int64)
    multiplier = np.asarray(multiplier, dtype=np.int64)
    total_shift = 31 + np.asarray(shift, dtype=np.int64)
    # |x·multiplier| <= 2**62, so the sum fits int64.
    product = x * multiplier
    half = np.int64(1) << (total_shift - 1)
    rounded = (product + half) >> total_shift
    # Half up gives the odd one of the two at a tie exactly when the even one is below it.
    tie = (product & ((half << 1) - 1)) == half
    rounded = rounded - (np.asarray(ties_to_even, dtype=bool) & tie & (rounded & 1 == 1))
    return wrap(rounded, 32)


#: The requantizer's roundings (REQUANT single_rounding, ties_to_even).
ROUNDING_MODES = ("double", "single", "double_even", "single_even")

#: TFLite's int8 Add scales its inputs by 2**20 before rescaling them (``left_shift``).
ADD_LEFT_SHIFT = 20


def _rescale(acc, bias, multiplier, shift, *, accumulator_width: int, rounding: str,
             left_shift) -> np.ndarray:
    """+ bias (wrapping), times 2**20 when ``left_shift`` (wrapping to 32 bits), then the
    multiplier and right shift with ``rounding``."""
    total = wrap(np.asarray(acc, dtype=np.int64) + bias, accumulator_width)
    total = np.where(np.asarray(left_shift, dtype=bool),
                     wrap(total * (np.int64(1) << ADD_LEFT_SHIFT), 32), total)
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDING_MODES)}, not "
                         f"{rounding!r}")
    even = rounding.endswith("_even")
    if rounding.startswith("single"):
        return single_rounding_multiply(total, multiplier, shift, even)
    return rounding_divide_by_pot(rounding_doubling_high_mul(total, multiplier), shift, even)


def requantize_raw(acc, bias, multiplier, shift, zero_point: int, *, accumulator_width: int,
                   rounding: str = "double", left_shift=0) -> np.ndarray:
    """The requantized value before clamping (REQUANT to_acc): rescaled as in
    :func:`requantize`, + zero point, wrapped to the accumulator width."""
    scaled = _rescale(acc, bias, multiplier, shift, accumulator_width=accumulator_width,
                      rounding=rounding, left_shift=left_shift)
    return wrap(scaled + zero_point, accumulator_width)


def requantize(acc, bias, multiplier, shift, zero_point: int, clamp_min: int,
               clamp_max: int, *, accumulator_width: int, output_width: int,
               rounding: str = "double", left_shift=0) -> np.ndarray:
    """Accumulator to output: + bias (wrapping), requantize, + zero point, clamp, saturate.

    ``rounding``: one of :data:`ROUNDING_MODES`: ``double`` (gemmlowp: rounding doubling
    high multiply, rounding shift, half away from zero), ``single`` (one rounding of the
    exact product, half up, see :func:`single_rounding_multiply`), and each with ``_even``:
    its last rounding takes halves to the even result (ONNX's QuantizeLinear).
    ``left_shift``: first multiply the biased accumulator by 2**20 (TFLite's Add).
    """
    scaled = _rescale(acc, bias, multiplier, shift, accumulator_width=accumulator_width,
                      rounding=rounding, left_shift=left_shift)
    out = np.clip(scaled + zero_point, clamp_min, clamp_max)
    return saturate(out, output_width)


def quantize_multiplier(scale: float) -> tuple[int, int]:
    """A real scale in (0, 1) as a Q31 multiplier and a right shift (TFLite).

    Returns ``(multiplier, shift)`` with ``scale ≈ multiplier · 2**(-31 - shift)``.
    """
    if not 0.0 < scale < 1.0:
        raise ValueError(f"requantization scale must be in (0, 1), not {scale!r}")
    mantissa, exponent = np.frexp(scale)  # scale = mantissa · 2**exponent, 0.5 <= m < 1
    multiplier = int(round(float(mantissa) * (1 << 31)))
    if multiplier == 1 << 31:
        multiplier //= 2
        exponent += 1
    shift = -int(exponent)
    if shift > 31:
        return 0, 0
    return multiplier, shift
