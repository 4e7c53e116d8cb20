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
from .graph import Dense, Model, ModelError, QuantParams, WeightShape

__all__ = ["QuantizedLayer", "QuantizedModel", "quantize_model", "activation_quant"]

INT8_MIN, INT8_MAX = -128, 127


@dataclass
class QuantizedLayer(WeightShape):
    """Everything the NPU needs for one dense layer, in integers."""

    name: str
    weight: np.ndarray        # int8 (K, N)
    bias: np.ndarray          # int32 (N), input zero point folded in
    multiplier: np.ndarray    # int32 Q31 (N)
    shift: np.ndarray         # right shift 0..31 (N)
    output_zero_point: int
    clamp_min: int
    clamp_max: int
    input_quant: QuantParams
    output_quant: QuantParams


@dataclass
class QuantizedModel:
    layers: list[QuantizedLayer]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

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
    calibration = np.asarray(calibration)
    if not np.issubdtype(calibration.dtype, np.floating):
        raise ValueError(f"calibration data must be floating point, not {calibration.dtype}")
    if calibration.ndim < 1 or calibration.shape[1:] != tuple(model.input_shape):
        raise ValueError(
            f"calibration data must have shape (batch, {', '.join(map(str, model.input_shape))})"
            f" for input {model.input_name!r}, not {calibration.shape}")
    if len(calibration) == 0:
        raise ValueError("calibration data is empty")
    if not np.all(np.isfinite(calibration)):
        raise ValueError("calibration data contains NaN or infinite values")
    return calibration.astype(np.float32).reshape(len(calibration), -1)


def _weight_quant(layer: Dense, input_scale: float) -> tuple[np.ndarray, QuantParams]:
    if layer.quantized_weight is not None and layer.weight_quant is not None:
        return layer.quantized_weight.astype(np.int64), layer.weight_quant
    peak = np.max(np.abs(layer.weight), axis=0).astype(np.float64)
    # A channel whose weights are (nearly) zero would get so small a scale that its bias,
    # at scale s_in·s_w, overflows int32: keep the bias within 2**30.
    bias_floor = np.abs(layer.bias.astype(np.float64)) / (input_scale * (1 << 30))
    scale = np.maximum(peak / INT8_MAX, bias_floor)
    scale = np.where(scale > 0, scale, 1.0 / INT8_MAX)
    quant = QuantParams(scale, np.zeros(layer.out_features, dtype=np.int64))
    weight = np.clip(np.round(layer.weight / scale), -INT8_MAX, INT8_MAX).astype(np.int64)
    return weight, quant


def _clamp(layer: Dense, out: QuantParams) -> tuple[int, int]:
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
        ranges.append((float(x.min()), float(x.max())))
        for layer in model.layers:
            x = layer.forward(x)
            ranges.append((float(x.min()), float(x.max())))

    def tensor_quant(index: int, key: str) -> QuantParams:
        if model.prequantized:
            if key not in model.tensor_quant:
                raise ModelError(f"the QDQ model has no quantization for tensor {key!r}")
            quant = model.tensor_quant[key]
            return QuantParams(float(np.asarray(quant.scale).reshape(-1)[0]),
                               int(np.asarray(quant.zero_point).reshape(-1)[0]))
        return activation_quant(*ranges[index])

    layers = []
    input_quant = tensor_quant(0, "input")
    for index, layer in enumerate(model.layers, start=1):
        output_quant = tensor_quant(index, layer.name)
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
        bias = bias - input_quant.zero_point * weight.sum(axis=0)
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
            input_quant, output_quant))
        input_quant = output_quant
    return QuantizedModel(layers, tuple(model.input_shape), tuple(model.output_shape))
