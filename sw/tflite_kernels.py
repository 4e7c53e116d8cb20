"""TFLite's int8 reference SOFTMAX, QUANTIZE and DEQUANTIZE in NumPy, bit-exact.

These are the host-side ops at a model's edges. They reproduce what LiteRT runs with
`OpResolverType.BUILTIN_REF` (the kReference kernels), bit for bit:

- SOFTMAX int8 -> int8 is `reference_ops::Softmax` (tflite/kernels/internal/reference/
  softmax.h): gemmlowp fixed point, no lookup table. `SoftmaxPrepare` (tflite/kernels/
  activations.cc) derives input_multiplier, input_left_shift and diff_min in double precision
  with `PreprocessSoftmaxScaling` and `CalculateInputRadius` (quantization_util.cc, built with
  TFLITE_SINGLE_ROUNDING=0). exp(x) is gemmlowp's `exp_on_negative_values` on Q5.26, the sum
  is accumulated in Q12.19, and 1/sum is `GetReciprocal` (common.h) built on gemmlowp's
  `one_over_one_plus_x_for_x_in_0_1` (fixedpoint/fixedpoint.h).
- QUANTIZE float32 -> int8 is `reference_ops::AffineQuantize`: round(value / float(scale)) in
  float32, half away from zero, plus the zero point, clamped.
- DEQUANTIZE int8 -> float32 is `reference_integer_ops::Dequantize`: the double product
  double(scale) * (q - zero_point), rounded once to float32.

The int32 arithmetic is emulated on int64 arrays, wrapping or saturating exactly where the C++
does, vectorized over all rows at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SoftmaxParams", "dequantize", "quantize", "softmax_int8"]

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
# softmax.h: the exp() input is Q5.26, the sum of exps is accumulated in Q12.19.
SCALED_DIFF_INTEGER_BITS = 5
ACCUMULATION_INTEGER_BITS = 12


# gemmlowp fixed-point primitives on int32 values held in int64 arrays


def _wrap32(x: np.ndarray) -> np.ndarray:
    """Two's-complement int32 wraparound (what the C++ int32 additions do in practice)."""
    return ((x + 2**31) & 0xFFFFFFFF) - 2**31


def _divide_truncating_pow2(x: np.ndarray, exponent: int) -> np.ndarray:
    """C++ integer division by 2**exponent (rounds toward zero)."""
    return np.where(x >= 0, x >> exponent, -((-x) >> exponent))


def _saturating_rounding_doubling_high_mul(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul for int32 (ARM VQRDMULH)."""
    a, b = np.broadcast_arrays(np.asarray(a, np.int64), np.asarray(b, np.int64))
    overflow = (a == b) & (a == INT32_MIN)
    product = a * b
    nudge = np.where(product >= 0, 1 << 30, 1 - (1 << 30))
    high = _divide_truncating_pow2(product + nudge, 31)
    return np.where(overflow, INT32_MAX, high)


def _rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray | int) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: arithmetic right shift rounding half away from zero."""
    exponent = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def _saturating_shift_left(x: np.ndarray, exponent: int) -> np.ndarray:
    """gemmlowp SaturatingRoundingMultiplyByPOT<exponent> for exponent > 0 on int32."""
    threshold = (1 << (31 - exponent)) - 1
    shifted = x << exponent
    shifted = np.where(x > threshold, INT32_MAX, shifted)
    return np.where(x < -threshold, INT32_MIN, shifted)


def _exp_on_interval_between_negative_one_quarter_and_0_excl(a: np.ndarray) -> np.ndarray:
    """gemmlowp: exp(a) for a in [-1/4, 0), Q0.31 in and out (Taylor series around -1/8)."""
    mul = _saturating_rounding_doubling_high_mul
    constant_term = 1895147668  # exp(-1/8)
    constant_1_over_3 = 715827883
    x = _wrap32(a + (1 << 28))
    x2 = mul(x, x)
    x3 = mul(x2, x)
    x4 = mul(x2, x2)
    x4_over_4 = _rounding_divide_by_pot(x4, 2)
    x4_over_24_plus_x3_over_6_plus_x2_over_2 = _rounding_divide_by_pot(
        _wrap32(mul(_wrap32(x4_over_4 + x3), constant_1_over_3) + x2), 1
    )
    return _wrap32(
        constant_term + mul(constant_term, _wrap32(x + x4_over_24_plus_x3_over_6_plus_x2_over_2))
    )


# exp(-2**k) in Q0.31 for the barrel shifter of exp_on_negative_values, k = -2 .. 4.
_EXP_BARREL_SHIFTER = (
    (-2, 1672461947),
    (-1, 1302514674),
    (0, 790015084),
    (1, 290630308),
    (2, 39332535),
    (3, 720401),
    (4, 242),
)


def _exp_on_negative_values_q5(a: np.ndarray) -> np.ndarray:
    """gemmlowp exp_on_negative_values for a Q5.26 input (a <= 0); Q0.31 result."""
    fractional_bits = 31 - SCALED_DIFF_INTEGER_BITS
    one_quarter = 1 << (fractional_bits - 2)
    a_mod_quarter_minus_one_quarter = (a & (one_quarter - 1)) - one_quarter
    result = _exp_on_interval_between_negative_one_quarter_and_0_excl(
        _saturating_shift_left(a_mod_quarter_minus_one_quarter, SCALED_DIFF_INTEGER_BITS)
    )
    remainder = _wrap32(a_mod_quarter_minus_one_quarter - a)
    for exponent, multiplier in _EXP_BARREL_SHIFTER:
        if SCALED_DIFF_INTEGER_BITS > exponent:
            bit = (remainder & (1 << (fractional_bits + exponent))) != 0
            result = np.where(bit, _saturating_rounding_doubling_high_mul(result, multiplier),
                              result)
    # kIntegerBits > 5 would clamp inputs below -32 to 0; Q5.26 cannot hold them.
    return np.where(a == 0, INT32_MAX, result)


def _one_over_one_plus_x_for_x_in_0_1(a: np.ndarray) -> np.ndarray:
    """gemmlowp: 1 / (1 + a) for a in [0, 1), Q0.31 in and out (Newton-Raphson)."""
    mul = _saturating_rounding_doubling_high_mul
    total = a + INT32_MAX  # RoundingHalfSum(a, One) in 64 bits, rounding away from zero
    half_denominator = _divide_truncating_pow2(total + np.where(total >= 0, 1, -1), 1)
    constant_48_over_17 = 1515870810  # Q2.29
    constant_neg_32_over_17 = -1010580540  # Q2.29
    one_q2 = 1 << 29
    x = _wrap32(constant_48_over_17 + mul(half_denominator, constant_neg_32_over_17))
    for _ in range(3):
        half_denominator_times_x = mul(half_denominator, x)
        one_minus_half_denominator_times_x = _wrap32(one_q2 - half_denominator_times_x)
        x = _wrap32(x + _saturating_shift_left(mul(x, one_minus_half_denominator_times_x), 2))
    # Rescale<0>(ExactMulByPot<-1>(x)): Q1.30 raw to Q0.31.
    return _saturating_shift_left(x, 1)


def _count_leading_zeros32(x: np.ndarray) -> np.ndarray:
    """Leading zeros of x as uint32 (32 for 0)."""
    value = x & 0xFFFFFFFF
    bits = np.zeros_like(value)
    for shift in (16, 8, 4, 2, 1):
        big = (value >> shift) > 0
        bits += np.where(big, shift, 0)
        value = np.where(big, value >> shift, value)
    return 32 - (bits + (value > 0))


def _get_reciprocal(x: np.ndarray, integer_digits: int) -> tuple[np.ndarray, np.ndarray]:
    """common.h GetReciprocal: (1/x in Q0.31 of x normalized to [1, 2), num_bits_over_unit)."""
    headroom_plus_one = _count_leading_zeros32(x)
    num_bits_over_unit = integer_digits - headroom_plus_one
    shifted = ((x & 0xFFFFFFFF) << headroom_plus_one) & 0xFFFFFFFF
    shifted_sum_minus_one = _wrap32(shifted - (1 << 31))
    return _one_over_one_plus_x_for_x_in_0_1(shifted_sum_minus_one), num_bits_over_unit


# Host-side helpers of Prepare, in double precision as in quantization_util.cc


def _round_half_away(value: float) -> float:
    """std::round on a double."""
    return math.copysign(math.floor(abs(value) + 0.5), value) if abs(value) < 2**52 else value


def _quantize_multiplier(multiplier: float) -> tuple[int, int]:
    """quantization_util.cc QuantizeMultiplier (double rounding build): (Q0.31, shift)."""
    if multiplier == 0.0:
        return 0, 0
    fraction, shift = math.frexp(multiplier)
    q_fixed = int(_round_half_away(fraction * (1 << 31)))
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q_fixed, shift


@dataclass(frozen=True)
class SoftmaxParams:
    """What TFLite's SoftmaxPrepare computes for the int8 reference kernel.

    `input_multiplier` (Q0.31) and `input_left_shift` scale an input difference to Q5.26;
    differences below `diff_min` give exp = 0.
    """

    input_multiplier: int
    input_left_shift: int
    diff_min: int

    @classmethod
    def from_scale(cls, input_scale: float, beta: float = 1.0) -> SoftmaxParams:
        """Parameters for an int8 input of `input_scale` and the op's `beta`.

        Both are float32 in the model; they are rounded to float32 first, as TFLite reads
        them. Raises ValueError when beta * input_scale is too small for the kernel
        (TFLite's QuantizeMultiplierGreaterThanOne check fails there).
        """
        beta_double = float(np.float32(beta))
        scale_double = float(np.float32(input_scale))
        real_multiplier = min(
            beta_double * scale_double * (1 << (31 - SCALED_DIFF_INTEGER_BITS)),
            (1 << 31) - 1.0,
        )
        if not real_multiplier > 1.0:
            raise ValueError(
                f"beta * input_scale = {beta_double * scale_double!r} is below 2**-26, "
                "which TFLite's int8 softmax does not support"
            )
        multiplier, left_shift = _quantize_multiplier(real_multiplier)
        # CalculateInputRadius(5, left_shift, 31), then diff_min = -1.0 * radius.
        radius = math.floor(
            1.0 * ((1 << SCALED_DIFF_INTEGER_BITS) - 1)
            * (1 << (31 - SCALED_DIFF_INTEGER_BITS)) / (1 << left_shift)
        )
        return cls(multiplier, left_shift, -radius)


def softmax_int8(
    x: np.ndarray,
    input_scale: float | None = None,
    beta: float = 1.0,
    *,
    params: SoftmaxParams | None = None,
) -> np.ndarray:
    """TFLite's reference int8 SOFTMAX over the last axis (output scale 1/256, zero point -128).

    `x` is int8 (any shape, softmax over the last axis); give `input_scale` (and the op's
    `beta`) or precomputed `params`. The input zero point does not matter (only differences
    to the row maximum enter). Returns int8 of x's shape, equal to LiteRT's BUILTIN_REF
    kernel bit for bit.
    """
    if params is None:
        if input_scale is None:
            raise ValueError("softmax_int8 needs input_scale or params")
        params = SoftmaxParams.from_scale(input_scale, beta)
    x = np.asarray(x)
    if x.dtype != np.int8:
        raise ValueError(f"softmax_int8 takes int8 input, not {x.dtype}")
    if x.ndim == 0:
        raise ValueError("softmax_int8 needs at least one axis")
    values = x.astype(np.int64)
    input_diff = values - values.max(axis=-1, keepdims=True)
    in_range = input_diff >= params.diff_min
    rescaled = _saturating_rounding_doubling_high_mul(
        _wrap32(input_diff * (1 << params.input_left_shift)), params.input_multiplier
    )
    exp_q0 = _exp_on_negative_values_q5(rescaled)
    # Rescale<12> from Q0.31 to Q12.19; the sum wraps as int32 (associative mod 2**32).
    exp_q12 = _rounding_divide_by_pot(exp_q0, ACCUMULATION_INTEGER_BITS)
    sum_of_exps = _wrap32(np.where(in_range, exp_q12, 0).sum(axis=-1, keepdims=True))
    shifted_scale, num_bits_over_unit = _get_reciprocal(sum_of_exps, ACCUMULATION_INTEGER_BITS)
    exponent = num_bits_over_unit + 31 - 8
    if (exponent < 0).any() or (exponent > 31).any():
        raise ValueError(
            "a row's sum of exps reaches 512 (e.g. 512 or more equal logits): TFLite's "
            "reference kernel aborts the process there (TFLITE_CHECK on the output exponent)"
        )
    unsaturated = _rounding_divide_by_pot(
        _saturating_rounding_doubling_high_mul(shifted_scale, exp_q0), exponent
    )
    output = np.clip(unsaturated - 128, -128, 127)
    return np.where(in_range, output, -128).astype(np.int8)


def quantize(
    values: np.ndarray, scale: float, zero_point: int, dtype: type = np.int8
) -> np.ndarray:
    """TFLite's reference QUANTIZE (AffineQuantize) of float32 values to int8 (or uint8/int16).

    round(value / float32(scale)) in float32, half away from zero, plus the zero point,
    clamped to the type's range. Values whose quotient leaves int32 (and NaN) become int32
    minimum first, as the x86 float-to-int conversion does, and so clamp to the minimum.
    """
    info = np.iinfo(dtype)
    values = np.asarray(values, np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        quotient = values / np.float32(scale)
        truncated = np.trunc(quotient)
        rounded = truncated + np.where(
            np.abs(quotient - truncated) >= np.float32(0.5), np.sign(quotient), 0
        ).astype(np.float32)
    finite = np.isfinite(rounded) & (rounded >= -(2.0**31)) & (rounded < 2.0**31)
    as_int32 = np.where(finite, np.where(finite, rounded, 0).astype(np.int64), INT32_MIN)
    unclamped = _wrap32(as_int32 + int(zero_point))
    return np.clip(unclamped, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """TFLite's reference DEQUANTIZE: float32(double(scale) * (q - zero_point))."""
    difference = np.asarray(q).astype(np.int64) - int(zero_point)
    return (float(np.float32(scale)) * difference.astype(np.float64)).astype(np.float32)


def litert_reference(model: str | Path | bytes):
    """A function from inputs (batch, *input shape) to the outputs (batch, features) of a
    .tflite model (a path or its bytes) in LiteRT's reference kernels
    (``OpResolverType.BUILTIN_REF``), one input at a time; None where ``ai-edge-litert``
    (a test dependency) is not installed. LiteRT's default kernels (XNNPACK) are
    optimized, differ from the reference and are not used."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        return None
    source = ({"model_content": bytes(model)} if isinstance(model, bytes | bytearray)
              else {"model_path": str(model)})
    interpreter = Interpreter(**source,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interpreter.allocate_tensors()
    (given,), (wanted,) = interpreter.get_input_details(), interpreter.get_output_details()

    def outputs(x: np.ndarray) -> np.ndarray:
        results = []
        for row in np.asarray(x):
            interpreter.set_tensor(given["index"], row[None].astype(given["dtype"]))
            interpreter.invoke()
            results.append(interpreter.get_tensor(wanted["index"])[0].copy())
        return np.stack(results).reshape(len(results), -1)

    return outputs
