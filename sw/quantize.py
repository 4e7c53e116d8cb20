"""Post-training quantization to the TFLite int8 scheme.

Weights: per-channel symmetric int8 (zero point 0). Activations: per-tensor asymmetric
int8, ranges from calibration data (or as a QDQ model prescribes). Bias: int32 with scale
``s_in · s_w``. Each output channel gets the Q31 multiplier and right shift of
``s_in · s_w / s_out``; the input zero point is folded into the bias, so the array
multiplies raw int8 activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arith import quantize_multiplier
from .graph import Add, Conv, Dense, Layer, Model, ModelError, Pool, QuantParams, WeightShape

__all__ = ["QuantizedLayer", "QuantizedModel", "quantize_model", "activation_quant"]

INT8_MIN, INT8_MAX = -128, 127


@dataclass
class QuantizedLayer(WeightShape):
    """Everything the NPU needs for one layer, in integers. ``source`` is the float layer
    (its geometry: kernel, stride, pads); pooling layers have no weights."""

    name: str
    weight: np.ndarray        # int8: (K, N) dense, (kh, kw, C_in, C_out) conv, (kh, kw, C)
    bias: np.ndarray          # int32 (N), input zero point folded in
    multiplier: np.ndarray    # int32 Q31 (N)
    shift: np.ndarray         # right shift 0..31 (N)
    output_zero_point: int
    clamp_min: int
    clamp_max: int
    input_quant: QuantParams
    output_quant: QuantParams
    source: Layer | None = None
    inputs: tuple[str, ...] = ()     # the tensors it reads ("input": the model's input)
    # An Add: (zero point, multiplier, shift) bringing each input's (q − z)·2^20 to the
    # common scale (TFLite); multiplier and shift then rescale the sum.
    rescales: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
    # How the requantizer rounds (REQUANT single_rounding, ties_to_even; ROUNDING_MODES):
    # "double" (gemmlowp, TFLite's convolutions and adds), "single" (TFLite's
    # FULLY_CONNECTED), "single_even" (ONNX: QuantizeLinear rounds halves to even), or
    # "double_even" (an ONNX average pooling divided exactly, see average_divisor).
    rounding: str = "double"
    # Average pooling as TFLite's reference kernel computes it: the array sums the raw
    # values times POOL_SUM_WEIGHT, the requantizer divides by the window's pixel count.
    exact_average: bool = False


@dataclass
class QuantizedModel:
    """A model in the NPU's integers (:func:`quantize_model`): its layers in execution
    order, its input and output shapes (no batch dimension, as the
    :class:`~npugen.graph.Model`'s) and that model. :attr:`input_quant` is the first layer's
    input quantization, :attr:`output_quant` the last layer's output quantization."""

    layers: list[QuantizedLayer]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    source: Model | None = None   # the model it came from (layouts, types, host operators)

    @property
    def input_quant(self) -> QuantParams:
        return self.layers[0].input_quant

    @property
    def output_quant(self) -> QuantParams:
        return self.layers[-1].output_quant


def activation_quant(low: float, high: float) -> QuantParams:
    """Per-tensor asymmetric int8 for the range [low, high] (widened to contain 0)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if high - low < 1e-8:
        high = low + 1e-8
    scale = (high - low) / (INT8_MAX - INT8_MIN)
    zero_point = int(np.clip(np.round(INT8_MIN - low / scale), INT8_MIN, INT8_MAX))
    return QuantParams(scale, zero_point)


def _check_calibration(model: Model, calibration: np.ndarray) -> np.ndarray:
    """The calibration batch in the model's own input layout (H×W×C for an NHWC model, as
    ``npugen run`` takes its inputs), returned C×H×W as the layers compute."""
    calibration = np.asarray(calibration)
    if not np.issubdtype(calibration.dtype, np.floating):
        raise ValueError(f"calibration data must be floating point, not {calibration.dtype}")
    hwc = model.input_layout == "hwc" and len(model.input_shape) == 3
    shape = tuple(model.input_shape)
    given_shape = (*shape[1:], shape[0]) if hwc else shape
    if calibration.ndim < 1 or calibration.shape[1:] != given_shape:
        raise ValueError(
            f"calibration data must have shape (batch, {', '.join(map(str, given_shape))})"
            f"{' (N×H×W×C, as the model takes its input)' if hwc else ''} for input "
            f"{model.input_name!r}, not {calibration.shape}")
    if hwc:
        calibration = np.moveaxis(calibration, -1, 1)
    if len(calibration) == 0:
        raise ValueError("calibration data is empty")
    if not np.all(np.isfinite(calibration)):
        raise ValueError("calibration data contains NaN or infinite values")
    return calibration.astype(np.float32)


def _weight_quant(layer: Dense | Conv, input_scale: float) -> tuple[np.ndarray, QuantParams]:
    if layer.quantized_weight is not None and layer.weight_quant is not None:
        return layer.quantized_weight.astype(np.int64), layer.weight_quant
    # Per output channel (the last axis): the peak over everything else.
    inner = tuple(range(layer.weight.ndim - 1))
    peak = np.max(np.abs(layer.weight), axis=inner).astype(np.float64)
    # A channel whose weights are (nearly) zero would get so small a scale that its bias,
    # at scale s_in·s_w, overflows int32: keep the bias within 2**30.
    bias_floor = np.abs(layer.bias.astype(np.float64)) / (input_scale * (1 << 30))
    scale = np.maximum(peak / INT8_MAX, bias_floor)
    scale = np.where(scale > 0, scale, 1.0 / INT8_MAX)
    quant = QuantParams(scale, np.zeros(layer.out_features, dtype=np.int64))
    weight = np.clip(np.round(layer.weight / scale), -INT8_MAX, INT8_MAX).astype(np.int64)
    return weight, quant


def _clamp(layer: Dense | Conv | Add, out: QuantParams) -> tuple[int, int]:
    if layer.clamp is not None:
        return int(layer.clamp[0]), int(layer.clamp[1])

    def bound(value: float, default: int) -> int:
        if not np.isfinite(value):
            return default
        return int(np.clip(np.round(value / out.scale) + out.zero_point, INT8_MIN, INT8_MAX))

    return bound(layer.low, INT8_MIN), bound(layer.high, INT8_MAX)


def quantize_model(model: Model, calibration: np.ndarray | None = None) -> QuantizedModel:
    """Quantize ``model``; float models need ``calibration`` (batch, *input_shape).

    Raises ``ValueError`` for bad calibration data or a scale the hardware cannot apply.
    """
    model.check()
    ranges: list[tuple[float, float]] = []
    if not model.prequantized:
        if calibration is None:
            raise ValueError("a float model needs calibration data (--calib X.npy) to "
                             "choose activation ranges")
        x = _check_calibration(model, calibration)
        for values in model.forward(x, every=True):
            ranges.append((float(values.min()), float(values.max())))

    def tensor_quant(index: int, key: str) -> QuantParams:
        if model.prequantized:
            if key not in model.tensor_quant:
                if key == "input":
                    raise ModelError(
                        f"the QDQ model's input {model.input_name!r} has no quantization: "
                        f"npugen needs a QuantizeLinear after a float input, or a "
                        f"DequantizeLinear reading an int8 input")
                raise ModelError(f"the QDQ model has no quantization for the output of "
                                 f"layer {key!r}: put a QuantizeLinear/DequantizeLinear pair "
                                 f"after it")
            quant = model.tensor_quant[key]
            return QuantParams(float(np.asarray(quant.scale).reshape(-1)[0]),
                               int(np.asarray(quant.zero_point).reshape(-1)[0]))
        return activation_quant(*ranges[index])

    layers = []
    shapes = dict(zip(["input"] + [layer.name for layer in model.layers], model.shapes(),
                      strict=True))
    quants = {"input": tensor_quant(0, "input")}
    for index, layer in enumerate(model.layers, start=1):
        names = model.input_names(index - 1)
        input_quant = quants[names[0]]
        if isinstance(layer, Pool) and layer.kind == "max" and (
                not model.prequantized or layer.name not in model.tensor_quant):
            output_quant = input_quant   # max pooling passes values through
        else:
            output_quant = tensor_quant(index, layer.name)
        quants[layer.name] = output_quant
        if isinstance(layer, Pool) and model.framework == "tflite":
            quantized = _quantize_tflite_pool(layer, shapes[names[0]], input_quant,
                                              output_quant)
        elif isinstance(layer, Pool):
            quantized = _quantize_pool(layer, shapes[names[0]], input_quant, output_quant,
                                       exact=model.framework == "onnx")
        elif isinstance(layer, Add):
            quantized = _quantize_add(layer, shapes[names[0]], input_quant,
                                      quants[names[1]], output_quant)
        else:
            quantized = None
        if quantized is not None:
            quantized.inputs = names
            quantized.rounding = _rounding(model, layer, quantized.exact_average)
            layers.append(quantized)
            continue
        weight, weight_quant = _weight_quant(layer, input_quant.scale)
        weight_scale = np.broadcast_to(np.asarray(weight_quant.scale, dtype=np.float64),
                                       (layer.out_features,))
        if np.any(np.asarray(weight_quant.zero_point) != 0):
            raise ModelError(f"layer {layer.name!r}: weight zero points must be 0 "
                             f"(symmetric int8)")
        if np.any(np.abs(weight) > INT8_MAX + 1):
            raise ModelError(f"layer {layer.name!r}: weights do not fit int8")
        bias_scale = input_quant.scale * weight_scale
        if layer.quantized_bias is not None:
            bias = layer.quantized_bias.astype(np.int64)
        else:
            bias = np.round(layer.bias / bias_scale).astype(np.int64)
        # The zero point is folded into the bias: the array multiplies raw int8 values,
        # and a convolution's padding holds the zero point too.
        bias = bias - input_quant.zero_point * weight.sum(axis=tuple(range(weight.ndim - 1)))
        if np.any(np.abs(bias) >= 1 << 31):
            raise ModelError(f"layer {layer.name!r}: a bias does not fit int32")
        multipliers, shifts = [], []
        for channel, scale in enumerate(bias_scale / output_quant.scale):
            try:
                multiplier, shift = quantize_multiplier(float(scale))
            except ValueError:
                raise ModelError(
                    f"layer {layer.name!r} channel {channel}: requantization scale "
                    f"s_in·s_w/s_out = {scale:.4g} is not in (0, 1), which the NPU cannot "
                    f"apply (a right shift only)") from None
            multipliers.append(multiplier)
            shifts.append(shift)
        clamp_min, clamp_max = _clamp(layer, output_quant)
        layers.append(QuantizedLayer(
            layer.name, weight, bias, np.array(multipliers, dtype=np.int64),
            np.array(shifts, dtype=np.int64), output_quant.zero_point, clamp_min, clamp_max,
            input_quant, output_quant, layer, names, rounding=_rounding(model, layer)))
    return QuantizedModel(layers, tuple(model.input_shape), tuple(model.output_shape), model)


def _rounding(model: Model, layer: Layer, exact_average: bool = False) -> str:
    """The rounding of a layer's requantization in its framework's arithmetic."""
    if model.framework == "onnx":
        return "double_even" if exact_average else "single_even"
    if model.framework == "tflite" and isinstance(layer, Dense):
        return "single"
    return "double"


#: The Q31 multiplier closest to 1: x · (2**31 − 1) with rounding returns x for any
#: |x| < 2**30, so it passes values through exactly.
IDENTITY_MULTIPLIER = (1 << 31) - 1


def _quantize_pool(layer: Pool, shape: tuple[int, ...], input_quant: QuantParams,
                   output_quant: QuantParams, exact: bool = False) -> QuantizedLayer:
    """Pooling as the NPU runs it: the array passes each channel's values through (max) or
    sums them (average) and the requantizer rescales: out = (acc − count·z_in) ·
    s_in / (s_out · count) + z_out.

    ``exact`` (ONNX): an unpadded average pooling whose input and output share their
    quantization gives round-half-to-even of the exact mean of q − z, + z, as ONNX defines
    it: the array sums the values times ``POOL_SUM_WEIGHT`` and the requantizer divides
    exactly (:func:`average_divisor`, its last rounding taking halves to even)."""
    channels = shape[0]
    count = 1 if layer.kind == "max" else (
        shape[1] * shape[2] if layer.kind == "global" else int(np.prod(layer.window)))
    same = (np.isclose(input_quant.scale, output_quant.scale, rtol=0, atol=0)
            and input_quant.zero_point == output_quant.zero_point)
    exact = exact and layer.kind != "max" and same and not any(layer.pads)
    if layer.kind == "max" and same:
        bias, multiplier, shift, zero_point = 0, IDENTITY_MULTIPLIER, 0, 0
    elif exact:
        multiplier, shift = average_divisor(count)
        bias = -POOL_SUM_WEIGHT * count * input_quant.zero_point
        zero_point = output_quant.zero_point
    else:
        scale = input_quant.scale / (output_quant.scale * count)
        try:
            # A scale of exactly 1 (a 1×1 map, or a range that shrinks exactly by the
            # count) passes values through.
            multiplier, shift = ((IDENTITY_MULTIPLIER, 0) if abs(scale - 1.0) < 1e-9
                                 else quantize_multiplier(float(scale)))
        except ValueError:
            raise ModelError(f"layer {layer.name!r}: its rescale s_in/(s_out·{count}) = "
                             f"{scale:.4g} is not in (0, 1)") from None
        bias, zero_point = -count * input_quant.zero_point, output_quant.zero_point
    full = np.full(channels, 1, dtype=np.int64)
    return QuantizedLayer(
        layer.name, np.zeros((0, channels), dtype=np.int64), full * bias, full * multiplier,
        full * shift, zero_point, INT8_MIN, INT8_MAX, input_quant, output_quant, layer,
        exact_average=exact)


def _quantize_add(layer: Add, shape: tuple[int, ...], first: QuantParams, second: QuantParams,
                  output: QuantParams) -> QuantizedLayer:
    """TFLite's int8 Add: each input as (q − z)·2^20 times s_i / (2·max(s_1, s_2)), the sum
    times 2·max(s_1, s_2) / (2^20·s_out), + z_out, clamped."""
    twice = 2.0 * max(first.scale, second.scale)
    rescales = []
    for quant in (first, second):
        multiplier, shift = quantize_multiplier(quant.scale / twice)
        rescales.append((quant.zero_point, multiplier, shift))
    try:
        multiplier, shift = quantize_multiplier(twice / ((1 << 20) * output.scale))
    except ValueError:
        raise ModelError(f"layer {layer.name!r}: its output scale {output.scale:.4g} is too "
                         f"small for its inputs' ({first.scale:.4g}, {second.scale:.4g})") from None
    channels = shape[0]
    clamp_min, clamp_max = _clamp(layer, output)
    full = np.ones(channels, dtype=np.int64)
    return QuantizedLayer(
        layer.name, np.zeros((0, channels), dtype=np.int64), 0 * full, full * multiplier,
        full * shift, output.zero_point, clamp_min, clamp_max, first, output, layer,
        rescales=tuple(rescales))


#: Average pooling of TFLite models: the array sums each window's raw values times this
#: weight, so that the requantizer's first rounding (to a Q31 product) is exact enough for
#: its second to be the reference kernel's rounded division (see average_divisor).
POOL_SUM_WEIGHT = 64


def average_divisor(count: int) -> tuple[int, int]:
    """(multiplier, shift) with which the requantizer (double rounding, bias 0, zero point
    0) turns ``POOL_SUM_WEIGHT``·S into S / ``count`` rounded half away from zero, as
    TFLite's reference AVERAGE_POOL_2D does, for every sum S of ``count`` int8 values
    (or, with ties to even at the rounding shift, half to even, as ONNX's QuantizeLinear
    does; the proof holds for |S| < 255·``count``, sums of q − z).

    With 2**t ≥ 2·count and M = round(2**(31+t) / (64·count)): the high multiply gives
    y = S·2**t/count + e, |e| ≤ 1/2 + |S|/2**26 < 1 (count < 2**17). Where S/count is a
    half, S·2**t/count is an integer and y equals it, so the rounding shift by t rounds the
    half away from zero exactly; elsewhere S/count is at least 1/(2·count) from a half and
    y/2**t at most (1/2 + 2**-19)/2**t < 1/(2·count) from S/count, so both round alike."""
    if not 1 <= count < 1 << 17:
        raise ModelError(f"average pooling over {count} values: the NPU divides sums of up "
                         f"to {(1 << 17) - 1} values")
    t = int(np.ceil(np.log2(count))) + 1
    multiplier = int(round((1 << (31 + t)) / (POOL_SUM_WEIGHT * count)))
    return multiplier, t


def _quantize_tflite_pool(layer: Pool, shape: tuple[int, ...], input_quant: QuantParams,
                          output_quant: QuantParams) -> QuantizedLayer:
    """TFLite's int8 pooling: input and output share one quantization; max passes values
    through, average divides the sum of the raw values by the pixels under the window
    (padding not counted) rounding half away from zero; then the activation's clamp."""
    if (not np.isclose(input_quant.scale, output_quant.scale, rtol=1e-6, atol=0)
            or input_quant.zero_point != output_quant.zero_point):
        raise ModelError(f"layer {layer.name!r}: TFLite pooling keeps the quantization, but "
                         f"its input has scale {input_quant.scale:.6g}, zero point "
                         f"{input_quant.zero_point} and its output {output_quant.scale:.6g}, "
                         f"{output_quant.zero_point}")
    channels = shape[0]
    full = np.ones(channels, dtype=np.int64)
    clamp_min, clamp_max = layer.clamp if layer.clamp is not None else (INT8_MIN, INT8_MAX)
    if layer.kind == "max":
        multiplier, shift = IDENTITY_MULTIPLIER, 0
    else:
        count = shape[1] * shape[2] if layer.kind == "global" else int(np.prod(layer.window))
        multiplier, shift = average_divisor(count)
    return QuantizedLayer(
        layer.name, np.zeros((0, channels), dtype=np.int64), 0 * full, full * multiplier,
        full * shift, 0, int(clamp_min), int(clamp_max), input_quant, output_quant, layer,
        exact_average=layer.kind != "max")
