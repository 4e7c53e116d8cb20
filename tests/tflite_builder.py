"""Write small full-integer int8 .tflite models from Python, without TensorFlow.

`TfliteBuilder` records a graph of TFLite builtin operators on int8 tensors (NHWC), picks
quantization parameters the way a post-training converter would, and serializes it as a
TFLite flatbuffer (schema version 3) with the `flatbuffers` package and the `tflite`
package's generated builder functions:

    b = TfliteBuilder(seed=0)
    x = b.input("input", (1, 16, 16, 3), scale=0.02, zero_point=-5)
    y = b.conv2d(x, filters=8, kernel=(3, 3), stride=2, padding="SAME", activation="RELU")
    y = b.softmax(b.fully_connected(b.reshape(y, (1, -1)), units=10))
    b.output(y)
    data = b.finish()

Weights are random (seeded) and quantized like the converter does: per-channel symmetric
int8 for CONV_2D and DEPTHWISE_CONV_2D, per-tensor symmetric int8 for FULLY_CONNECTED,
int32 biases with scale input_scale * weight_scale. Output scales come from a float
calibration pass: every tensor carries a float32 batch of calibration values (random
inputs over the graph input's quantized range, propagated with the dequantized weights),
and each op's output range is taken from it, so outputs are not saturated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import flatbuffers
import numpy as np
import tflite
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["TensorRef", "TfliteBuilder"]

ACTIVATIONS = {
    "NONE": tflite.ActivationFunctionType.NONE,
    "RELU": tflite.ActivationFunctionType.RELU,
    "RELU6": tflite.ActivationFunctionType.RELU6,
}
PADDINGS = {"SAME": tflite.Padding.SAME, "VALID": tflite.Padding.VALID}
TENSOR_TYPES = {
    "float32": tflite.TensorType.FLOAT32,
    "int32": tflite.TensorType.INT32,
    "int8": tflite.TensorType.INT8,
}
OP = tflite.BuiltinOperator
# Operator versions the converter writes for int8 kernels (RESHAPE's resolver knows only 1).
OP_VERSIONS = {
    OP.ADD: 2,
    OP.AVERAGE_POOL_2D: 2,
    OP.CONCATENATION: 2,
    OP.CONV_2D: 3,
    OP.DEPTHWISE_CONV_2D: 3,
    OP.DEQUANTIZE: 2,
    OP.FULLY_CONNECTED: 4,
    OP.MAX_POOL_2D: 2,
    OP.MEAN: 2,
    OP.PAD: 2,
    OP.QUANTIZE: 2,
    OP.RELU: 2,
    OP.RELU6: 2,
    OP.RELU_N1_TO_1: 1,
    OP.RESHAPE: 1,
    OP.SOFTMAX: 2,
    OP.TRANSPOSE: 2,
}
CALIBRATION_SAMPLES = 16


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the graph being built: its index in the subgraph, shape and quantization.

    `scale` and `zero_point` are None for float32 and int32 tensors.
    """

    index: int
    shape: tuple[int, ...]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    buffer: int
    scales: np.ndarray | None
    zero_points: np.ndarray | None
    quantized_dimension: int


@dataclass
class _Operator:
    code: int
    inputs: list[int]
    outputs: list[int]
    options_type: int
    options: Callable[[flatbuffers.Builder], int] | None


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{what} must be a positive integer or a pair of them, not {value!r}")
    return pair


def _check_choice(value: str, choices: dict, what: str) -> int:
    if value not in choices:
        raise ValueError(f"{what} must be one of {sorted(choices)}, not {value!r}")
    return choices[value]


def _out_size_and_pad(size: int, window: int, stride: int, padding: str) -> tuple[int, int]:
    """Output size and leading padding of one spatial axis, as TFLite computes them."""
    if padding == "SAME":
        out = -(-size // stride)
        total = max((out - 1) * stride + window - size, 0)
        return out, total // 2
    out = (size - window) // stride + 1
    if out < 1:
        raise ValueError(f"window {window} does not fit VALID into an axis of size {size}")
    return out, 0


def _windows(
    x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: str, fill: float
) -> np.ndarray:
    """Sliding windows of an (N, H, W, C) batch: (N, OH, OW, C, KH, KW)."""
    _, h, w, _ = x.shape
    oh, pad_top = _out_size_and_pad(h, kernel[0], stride[0], padding)
    ow, pad_left = _out_size_and_pad(w, kernel[1], stride[1], padding)
    pad_bottom = max((oh - 1) * stride[0] + kernel[0] - h - pad_top, 0)
    pad_right = max((ow - 1) * stride[1] + kernel[1] - w - pad_left, 0)
    padded = np.pad(
        x, ((0, 0), (pad_top, pad_bottom), (pad_left, pad_right), (0, 0)), constant_values=fill
    )
    view = sliding_window_view(padded, kernel, axis=(1, 2))
    return view[:, :: stride[0], :: stride[1]][:, :oh, :ow]


def _activate(values: np.ndarray, activation: str) -> np.ndarray:
    if activation == "RELU":
        return np.maximum(values, 0.0)
    if activation == "RELU6":
        return np.clip(values, 0.0, 6.0)
    if activation == "RELU_N1_TO_1":
        return np.clip(values, -1.0, 1.0)
    return values


def _choose_quant(values: np.ndarray) -> tuple[float, int]:
    """Asymmetric int8 scale and zero point covering the values' range (and 0)."""
    low = min(float(values.min()), 0.0)
    high = max(float(values.max()), 0.0)
    if high - low < 1e-6:
        high = low + 1e-3
    scale = float(np.float32((high - low) / 255.0))
    zero_point = int(np.clip(np.round(-128.0 - low / scale), -128, 127))
    return scale, zero_point


def _quantize_symmetric(weights: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights (range ±127) with per-channel (along axis) or per-tensor scales."""
    if axis is None:
        peak = np.array([np.abs(weights).max()])
        scales = (np.maximum(peak, 1e-8) / 127.0).astype(np.float32)
        q = np.round(weights / scales[0])
    else:
        other = tuple(i for i in range(weights.ndim) if i != axis)
        peak = np.abs(weights).max(axis=other)
        scales = (np.maximum(peak, 1e-8) / 127.0).astype(np.float32)
        shape = [1] * weights.ndim
        shape[axis] = -1
        q = np.round(weights / scales.reshape(shape))
    return np.clip(q, -127, 127).astype(np.int8), scales


class TfliteBuilder:
    """Builds a single-subgraph int8 TFLite model; each op method returns its output tensor.

    Parameters: `seed` seeds the generator used for calibration inputs and, when an op is
    given no `rng`, for its weights. Every op that produces a new quantized tensor takes
    `quant=(scale, zero_point)` to override the calibrated choice.
    """

    def __init__(self, *, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)
        self._tensors: list[_Tensor] = []
        self._buffers: list[bytes] = [b""]
        self._operators: list[_Operator] = []
        self._calibration: dict[int, np.ndarray] = {}
        self._inputs: list[int] = []
        self._outputs: list[int] = []

    # Tensors

    def _add_tensor(
        self,
        name: str,
        shape: Sequence[int],
        dtype: str,
        *,
        data: np.ndarray | None = None,
        scales: Sequence[float] | np.ndarray | None = None,
        zero_points: Sequence[int] | np.ndarray | None = None,
        quantized_dimension: int = 0,
    ) -> int:
        buffer = 0
        if data is not None:
            buffer = len(self._buffers)
            little_endian = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
            self._buffers.append(little_endian.tobytes())
        self._tensors.append(
            _Tensor(
                name=name,
                shape=tuple(int(s) for s in shape),
                dtype=dtype,
                buffer=buffer,
                scales=None if scales is None else np.asarray(scales, dtype=np.float32),
                zero_points=None if zero_points is None else np.asarray(zero_points, np.int64),
                quantized_dimension=quantized_dimension,
            )
        )
        return len(self._tensors) - 1

    def _activation_tensor(
        self,
        kind: str,
        values: np.ndarray,
        quant: tuple[float, int] | None,
        dtype: str = "int8",
    ) -> TensorRef:
        """Adds an op's output tensor with its calibration values and quantization."""
        shape = tuple(values.shape[1:])
        name = f"{kind.lower()}_{len(self._tensors)}"
        if dtype != "int8":
            index = self._add_tensor(name, shape, dtype)
            self._calibration[index] = values.astype(np.float32)
            return TensorRef(index, shape, dtype)
        scale, zero_point = quant if quant is not None else _choose_quant(values)
        index = self._add_tensor(name, shape, "int8", scales=[scale], zero_points=[zero_point])
        self._calibration[index] = values.astype(np.float32)
        return TensorRef(index, shape, "int8", float(np.float32(scale)), int(zero_point))

    def _constant(self, name: str, values: np.ndarray, **quant) -> int:
        dtype = {np.dtype(np.int8): "int8", np.dtype(np.int32): "int32"}[values.dtype]
        return self._add_tensor(name, values.shape, dtype, data=values, **quant)

    def _add_op(
        self,
        code: int,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options_type: int = tflite.BuiltinOptions.NONE,
        options: Callable[[flatbuffers.Builder], int] | None = None,
    ) -> None:
        self._operators.append(_Operator(code, list(inputs), list(outputs), options_type, options))

    def _values(self, x: TensorRef) -> np.ndarray:
        return self._calibration[x.index]

    @staticmethod
    def _require_int8(x: TensorRef, op: str) -> None:
        if x.dtype != "int8":
            raise ValueError(f"{op} takes an int8 tensor, not {x.dtype} (tensor {x.index})")

    # Graph inputs and outputs

    def input(
        self,
        name: str,
        shape: Sequence[int],
        *,
        scale: float,
        zero_point: int,
        dtype: str = "int8",
    ) -> TensorRef:
        """A graph input with the given int8 quantization.

        With dtype "float32" the graph input is float32 and is followed by QUANTIZE to int8
        (scale, zero_point); the QUANTIZE output is returned.
        """
        if dtype not in ("int8", "float32"):
            raise ValueError(f"input dtype must be 'int8' or 'float32', not {dtype!r}")
        shape = tuple(int(s) for s in shape)
        low = scale * (-128 - zero_point)
        high = scale * (127 - zero_point)
        values = self._rng.uniform(low, high, size=(CALIBRATION_SAMPLES, *shape))
        if dtype == "float32":
            index = self._add_tensor(name, shape, "float32")
            self._calibration[index] = values.astype(np.float32)
            self._inputs.append(index)
            return self.quantize(TensorRef(index, shape, "float32"), scale, zero_point)
        index = self._add_tensor(name, shape, "int8", scales=[scale], zero_points=[zero_point])
        self._calibration[index] = values.astype(np.float32)
        self._inputs.append(index)
        return TensorRef(index, shape, "int8", float(np.float32(scale)), int(zero_point))

    def output(self, x: TensorRef, *, dtype: str = "int8") -> TensorRef:
        """Marks x as a graph output; with dtype "float32" through a DEQUANTIZE."""
        if dtype == "float32" and x.dtype == "int8":
            x = self.dequantize(x)
        elif dtype != x.dtype:
            raise ValueError(f"output dtype must be 'int8' or 'float32', not {dtype!r}")
        self._outputs.append(x.index)
        return x

    # Operators

    def quantize(self, x: TensorRef, scale: float, zero_point: int) -> TensorRef:
        """QUANTIZE a float32 tensor to int8 (scale, zero_point)."""
        if x.dtype != "float32":
            raise ValueError(f"QUANTIZE takes a float32 tensor, not {x.dtype}")
        low, high = scale * (-128 - zero_point), scale * (127 - zero_point)
        out = self._activation_tensor(
            "QUANTIZE", np.clip(self._values(x), low, high), (scale, zero_point)
        )
        self._add_op(
            OP.QUANTIZE, [x.index], [out.index], tflite.BuiltinOptions.QuantizeOptions,
            lambda fb: (tflite.QuantizeOptionsStart(fb), tflite.QuantizeOptionsEnd(fb))[1],
        )
        return out

    def dequantize(self, x: TensorRef) -> TensorRef:
        """DEQUANTIZE an int8 tensor to float32."""
        self._require_int8(x, "DEQUANTIZE")
        out = self._activation_tensor("DEQUANTIZE", self._values(x), None, dtype="float32")
        self._add_op(
            OP.DEQUANTIZE, [x.index], [out.index], tflite.BuiltinOptions.DequantizeOptions,
            lambda fb: (tflite.DequantizeOptionsStart(fb), tflite.DequantizeOptionsEnd(fb))[1],
        )
        return out

    def _bias(
        self, name: str, pre_bias: np.ndarray, input_scale: float, weight_scales: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[int, np.ndarray]:
        """Random int32 bias (about half the per-channel spread of the accumulations)."""
        channels = pre_bias.shape[-1]
        spread = pre_bias.reshape(-1, channels).std(axis=0) + 1e-6
        bias_scales = (np.float32(input_scale) * weight_scales).astype(np.float32)
        float_bias = rng.normal(0.0, 0.5, channels) * spread
        q = np.round(float_bias / np.broadcast_to(bias_scales, (channels,)))
        q = np.clip(q, -(2**31), 2**31 - 1).astype(np.int32)
        index = self._constant(
            name, q, scales=bias_scales, zero_points=np.zeros(bias_scales.size, np.int64),
            quantized_dimension=0,
        )
        return index, q * np.broadcast_to(bias_scales, (channels,)).astype(np.float64)

    def conv2d(
        self,
        x: TensorRef,
        *,
        filters: int,
        kernel: int | Sequence[int] = (3, 3),
        stride: int | Sequence[int] = 1,
        padding: str = "SAME",
        activation: str = "NONE",
        rng: np.random.Generator | None = None,
        quant: tuple[float, int] | None = None,
    ) -> TensorRef:
        """CONV_2D with random per-channel int8 filters [O, KH, KW, I] and an int32 bias."""
        self._require_int8(x, "CONV_2D")
        rng = rng or self._rng
        kernel, stride = _pair(kernel, "kernel"), _pair(stride, "stride")
        padding_code = _check_choice(padding, PADDINGS, "padding")
        activation_code = _check_choice(activation, ACTIVATIONS, "activation")
        channels = x.shape[-1]
        fan_in = kernel[0] * kernel[1] * channels
        weights = rng.normal(0.0, np.sqrt(2.0 / fan_in), (filters, *kernel, channels))
        q_weights, w_scales = _quantize_symmetric(weights, axis=0)
        values = self._values(x)
        samples, batch = values.shape[:2]
        windows = _windows(values.reshape(-1, *x.shape[1:]), kernel, stride, padding, 0.0)
        real = q_weights * w_scales[:, None, None, None]
        pre_bias = np.einsum("nhwcij,oijc->nhwo", windows, real)
        w_index = self._constant(
            f"conv2d_{len(self._tensors)}/filter", q_weights, scales=w_scales,
            zero_points=np.zeros(filters, np.int64), quantized_dimension=0,
        )
        b_index, bias = self._bias(f"conv2d_{len(self._tensors)}/bias", pre_bias, x.scale,
                                   w_scales, rng)
        result = _activate(pre_bias + bias, activation)
        out = self._activation_tensor(
            "CONV_2D", result.reshape(samples, batch, *result.shape[1:]), quant
        )

        def options(fb: flatbuffers.Builder) -> int:
            tflite.Conv2DOptionsStart(fb)
            tflite.Conv2DOptionsAddPadding(fb, padding_code)
            tflite.Conv2DOptionsAddStrideH(fb, stride[0])
            tflite.Conv2DOptionsAddStrideW(fb, stride[1])
            tflite.Conv2DOptionsAddDilationHFactor(fb, 1)
            tflite.Conv2DOptionsAddDilationWFactor(fb, 1)
            tflite.Conv2DOptionsAddFusedActivationFunction(fb, activation_code)
            return tflite.Conv2DOptionsEnd(fb)

        self._add_op(OP.CONV_2D, [x.index, w_index, b_index], [out.index],
                     tflite.BuiltinOptions.Conv2DOptions, options)
        return out

    def depthwise_conv2d(
        self,
        x: TensorRef,
        *,
        kernel: int | Sequence[int] = (3, 3),
        depth_multiplier: int = 1,
        stride: int | Sequence[int] = 1,
        padding: str = "SAME",
        activation: str = "NONE",
        rng: np.random.Generator | None = None,
        quant: tuple[float, int] | None = None,
    ) -> TensorRef:
        """DEPTHWISE_CONV_2D with per-channel int8 filters [1, KH, KW, C*M] and an int32 bias."""
        self._require_int8(x, "DEPTHWISE_CONV_2D")
        rng = rng or self._rng
        kernel, stride = _pair(kernel, "kernel"), _pair(stride, "stride")
        padding_code = _check_choice(padding, PADDINGS, "padding")
        activation_code = _check_choice(activation, ACTIVATIONS, "activation")
        if not isinstance(depth_multiplier, int) or depth_multiplier < 1:
            raise ValueError(
                f"depth_multiplier must be a positive integer, not {depth_multiplier!r}"
            )
        channels = x.shape[-1]
        out_channels = channels * depth_multiplier
        fan_in = kernel[0] * kernel[1]
        weights = rng.normal(0.0, np.sqrt(2.0 / fan_in), (1, *kernel, out_channels))
        q_weights, w_scales = _quantize_symmetric(weights, axis=3)
        values = self._values(x)
        samples, batch = values.shape[:2]
        windows = _windows(values.reshape(-1, *x.shape[1:]), kernel, stride, padding, 0.0)
        real = (q_weights[0] * w_scales).reshape(*kernel, channels, depth_multiplier)
        pre_bias = np.einsum("nhwcij,ijcm->nhwcm", windows, real)
        pre_bias = pre_bias.reshape(*pre_bias.shape[:3], out_channels)
        w_index = self._constant(
            f"depthwise_{len(self._tensors)}/filter", q_weights, scales=w_scales,
            zero_points=np.zeros(out_channels, np.int64), quantized_dimension=3,
        )
        b_index, bias = self._bias(f"depthwise_{len(self._tensors)}/bias", pre_bias, x.scale,
                                   w_scales, rng)
        result = _activate(pre_bias + bias, activation)
        out = self._activation_tensor(
            "DEPTHWISE_CONV_2D", result.reshape(samples, batch, *result.shape[1:]), quant
        )

        def options(fb: flatbuffers.Builder) -> int:
            tflite.DepthwiseConv2DOptionsStart(fb)
            tflite.DepthwiseConv2DOptionsAddPadding(fb, padding_code)
            tflite.DepthwiseConv2DOptionsAddStrideH(fb, stride[0])
            tflite.DepthwiseConv2DOptionsAddStrideW(fb, stride[1])
            tflite.DepthwiseConv2DOptionsAddDepthMultiplier(fb, depth_multiplier)
            tflite.DepthwiseConv2DOptionsAddDilationHFactor(fb, 1)
            tflite.DepthwiseConv2DOptionsAddDilationWFactor(fb, 1)
            tflite.DepthwiseConv2DOptionsAddFusedActivationFunction(fb, activation_code)
            return tflite.DepthwiseConv2DOptionsEnd(fb)

        self._add_op(OP.DEPTHWISE_CONV_2D, [x.index, w_index, b_index], [out.index],
                     tflite.BuiltinOptions.DepthwiseConv2DOptions, options)
        return out

    def fully_connected(
        self,
        x: TensorRef,
        *,
        units: int,
        activation: str = "NONE",
        rng: np.random.Generator | None = None,
        quant: tuple[float, int] | None = None,
    ) -> TensorRef:
        """FULLY_CONNECTED with per-tensor int8 weights [units, in] and an int32 bias.

        The input's last axis is the feature axis; the output is [flat_size / in, units].
        """
        self._require_int8(x, "FULLY_CONNECTED")
        rng = rng or self._rng
        activation_code = _check_choice(activation, ACTIVATIONS, "activation")
        features = x.shape[-1]
        weights = rng.normal(0.0, np.sqrt(2.0 / features), (units, features))
        q_weights, w_scales = _quantize_symmetric(weights, axis=None)
        values = self._values(x)
        rows = values.reshape(values.shape[0], -1, features)
        pre_bias = rows @ (q_weights.astype(np.float64) * w_scales[0]).T
        w_index = self._constant(
            f"fully_connected_{len(self._tensors)}/weights", q_weights, scales=w_scales,
            zero_points=[0],
        )
        b_index, bias = self._bias(f"fully_connected_{len(self._tensors)}/bias", pre_bias,
                                   x.scale, w_scales, rng)
        out = self._activation_tensor(
            "FULLY_CONNECTED", _activate(pre_bias + bias, activation), quant
        )

        def options(fb: flatbuffers.Builder) -> int:
            tflite.FullyConnectedOptionsStart(fb)
            tflite.FullyConnectedOptionsAddFusedActivationFunction(fb, activation_code)
            tflite.FullyConnectedOptionsAddKeepNumDims(fb, False)
            return tflite.FullyConnectedOptionsEnd(fb)

        self._add_op(OP.FULLY_CONNECTED, [x.index, w_index, b_index], [out.index],
                     tflite.BuiltinOptions.FullyConnectedOptions, options)
        return out

    def add(
        self,
        a: TensorRef,
        b: TensorRef,
        *,
        activation: str = "NONE",
        quant: tuple[float, int] | None = None,
    ) -> TensorRef:
        """Elementwise ADD of two int8 tensors of the same shape."""
        self._require_int8(a, "ADD")
        self._require_int8(b, "ADD")
        if a.shape != b.shape:
            raise ValueError(f"ADD needs equal shapes, not {a.shape} and {b.shape}")
        activation_code = _check_choice(activation, ACTIVATIONS, "activation")
        result = _activate(self._values(a) + self._values(b), activation)
        out = self._activation_tensor("ADD", result, quant)

        def options(fb: flatbuffers.Builder) -> int:
            tflite.AddOptionsStart(fb)
            tflite.AddOptionsAddFusedActivationFunction(fb, activation_code)
            return tflite.AddOptionsEnd(fb)

        self._add_op(OP.ADD, [a.index, b.index], [out.index],
                     tflite.BuiltinOptions.AddOptions, options)
        return out

    def _pool(
        self,
        code: int,
        x: TensorRef,
        pool: int | Sequence[int],
        stride: int | Sequence[int] | None,
        padding: str,
        activation: str,
    ) -> TensorRef:
        self._require_int8(x, "pooling")
        pool = _pair(pool, "pool")
        stride = pool if stride is None else _pair(stride, "stride")
        padding_code = _check_choice(padding, PADDINGS, "padding")
        activation_code = _check_choice(activation, ACTIVATIONS, "activation")
        values = self._values(x)
        flat = values.reshape(-1, *x.shape[1:])
        if code == OP.MAX_POOL_2D:
            result = _windows(flat, pool, stride, padding, -np.inf).max(axis=(-2, -1))
        else:
            # TFLite averages over the window's elements inside the input only.
            total = _windows(flat, pool, stride, padding, 0.0).sum(axis=(-2, -1))
            count = _windows(np.ones_like(flat[:1]), pool, stride, padding, 0.0).sum(axis=(-2, -1))
            result = total / count
        result = _activate(result, activation).reshape(values.shape[0], values.shape[1],
                                                       *result.shape[1:])
        # Int8 pooling requires the output quantization to equal the input's.
        out = self._activation_tensor(
            "MAX_POOL_2D" if code == OP.MAX_POOL_2D else "AVERAGE_POOL_2D",
            result, (x.scale, x.zero_point),
        )

        def options(fb: flatbuffers.Builder) -> int:
            tflite.Pool2DOptionsStart(fb)
            tflite.Pool2DOptionsAddPadding(fb, padding_code)
            tflite.Pool2DOptionsAddStrideH(fb, stride[0])
            tflite.Pool2DOptionsAddStrideW(fb, stride[1])
            tflite.Pool2DOptionsAddFilterHeight(fb, pool[0])
            tflite.Pool2DOptionsAddFilterWidth(fb, pool[1])
            tflite.Pool2DOptionsAddFusedActivationFunction(fb, activation_code)
            return tflite.Pool2DOptionsEnd(fb)

        self._add_op(code, [x.index], [out.index], tflite.BuiltinOptions.Pool2DOptions, options)
        return out

    def average_pool2d(
        self,
        x: TensorRef,
        *,
        pool: int | Sequence[int] = (2, 2),
        stride: int | Sequence[int] | None = None,
        padding: str = "VALID",
        activation: str = "NONE",
    ) -> TensorRef:
        """AVERAGE_POOL_2D (stride defaults to the pool size); output quantized as the input."""
        return self._pool(OP.AVERAGE_POOL_2D, x, pool, stride, padding, activation)

    def max_pool2d(
        self,
        x: TensorRef,
        *,
        pool: int | Sequence[int] = (2, 2),
        stride: int | Sequence[int] | None = None,
        padding: str = "VALID",
        activation: str = "NONE",
    ) -> TensorRef:
        """MAX_POOL_2D (stride defaults to the pool size); output quantized as the input."""
        return self._pool(OP.MAX_POOL_2D, x, pool, stride, padding, activation)

    def activation(self, x: TensorRef, kind: str,
                   quant: tuple[float, int] | None = None) -> TensorRef:
        """RELU, RELU6 or RELU_N1_TO_1 as an operator of its own (as converters write one
        they cannot fuse); its output keeps the input's quantization unless ``quant``."""
        self._require_int8(x, kind)
        code = {"RELU": OP.RELU, "RELU6": OP.RELU6, "RELU_N1_TO_1": OP.RELU_N1_TO_1}[kind]
        out = self._activation_tensor(kind, _activate(self._values(x), kind),
                                      quant or (x.scale, x.zero_point))
        self._add_op(code, [x.index], [out.index])
        return out

    def reshape(self, x: TensorRef, shape: Sequence[int]) -> TensorRef:
        """RESHAPE (one axis may be -1), with a new_shape int32 input as converters emit."""
        size = int(np.prod(x.shape))
        shape = [int(s) for s in shape]
        if shape.count(-1) > 1:
            raise ValueError(f"reshape allows at most one -1, not {shape}")
        if -1 in shape:
            known = int(np.prod([s for s in shape if s != -1]))
            shape[shape.index(-1)] = size // known if known else 0
        if int(np.prod(shape)) != size:
            raise ValueError(f"cannot reshape {x.shape} ({size} elements) to {shape}")
        values = self._values(x)
        shape_index = self._constant(f"reshape_{len(self._tensors)}/shape",
                                     np.array(shape, np.int32))
        out = self._activation_tensor(
            "RESHAPE", values.reshape(values.shape[0], *shape),
            (x.scale, x.zero_point) if x.dtype == "int8" else None, dtype=x.dtype,
        )

        def options(fb: flatbuffers.Builder) -> int:
            new_shape = fb.CreateNumpyVector(np.array(shape, np.int32))
            tflite.ReshapeOptionsStart(fb)
            tflite.ReshapeOptionsAddNewShape(fb, new_shape)
            return tflite.ReshapeOptionsEnd(fb)

        self._add_op(OP.RESHAPE, [x.index, shape_index], [out.index],
                     tflite.BuiltinOptions.ReshapeOptions, options)
        return out

    def transpose(self, x: TensorRef, perm: Sequence[int]) -> TensorRef:
        """TRANSPOSE with a perm int32 input (as converters of NCHW models write at the
        graph's edges); the output keeps the input's quantization."""
        self._require_int8(x, "TRANSPOSE")
        perm = [int(p) for p in perm]
        if sorted(perm) != list(range(len(x.shape))):
            raise ValueError(f"perm {perm} is not a permutation of {len(x.shape)} axes")
        values = np.transpose(self._values(x), [0, *(p + 1 for p in perm)])
        perm_index = self._constant(f"transpose_{len(self._tensors)}/perm",
                                    np.array(perm, np.int32))
        out = self._activation_tensor("TRANSPOSE", values, (x.scale, x.zero_point))
        self._add_op(
            OP.TRANSPOSE, [x.index, perm_index], [out.index],
            tflite.BuiltinOptions.TransposeOptions,
            lambda fb: (tflite.TransposeOptionsStart(fb), tflite.TransposeOptionsEnd(fb))[1],
        )
        return out

    def pad(self, x: TensorRef, paddings: Sequence[Sequence[int]]) -> TensorRef:
        """PAD with zeros (the zero point), paddings [[before, after]] per axis (int32 input)."""
        self._require_int8(x, "PAD")
        table = np.array(paddings, np.int32)
        if table.shape != (len(x.shape), 2) or (table < 0).any():
            raise ValueError(
                f"paddings must be {len(x.shape)} non-negative [before, after] pairs, "
                f"not {paddings!r}"
            )
        values = self._values(x)
        result = np.pad(values, ((0, 0), *map(tuple, table)))
        pad_index = self._constant(f"pad_{len(self._tensors)}/paddings", table)
        out = self._activation_tensor("PAD", result, (x.scale, x.zero_point))
        self._add_op(
            OP.PAD, [x.index, pad_index], [out.index], tflite.BuiltinOptions.PadOptions,
            lambda fb: (tflite.PadOptionsStart(fb), tflite.PadOptionsEnd(fb))[1],
        )
        return out

    def mean(
        self,
        x: TensorRef,
        axes: Sequence[int] = (1, 2),
        *,
        keep_dims: bool = True,
        quant: tuple[float, int] | None = None,
    ) -> TensorRef:
        """MEAN over axes (an int32 axes input), keep_dims in ReducerOptions."""
        self._require_int8(x, "MEAN")
        axes = sorted(a % len(x.shape) for a in axes)
        values = self._values(x)
        result = values.mean(axis=tuple(a + 1 for a in axes), keepdims=keep_dims)
        axes_index = self._constant(f"mean_{len(self._tensors)}/axes", np.array(axes, np.int32))
        out = self._activation_tensor("MEAN", result, quant)

        def options(fb: flatbuffers.Builder) -> int:
            tflite.ReducerOptionsStart(fb)
            tflite.ReducerOptionsAddKeepDims(fb, keep_dims)
            return tflite.ReducerOptionsEnd(fb)

        self._add_op(OP.MEAN, [x.index, axes_index], [out.index],
                     tflite.BuiltinOptions.ReducerOptions, options)
        return out

    def concatenation(self, tensors: Sequence[TensorRef], axis: int = -1) -> TensorRef:
        """CONCATENATION (default: the channel axis) of int8 tensors quantized alike.

        TFLite's int8 kernel does not rescale, so all inputs must share scale and zero point.
        """
        if len(tensors) < 2:
            raise ValueError(f"concatenation needs at least two tensors, not {len(tensors)}")
        first = tensors[0]
        for t in tensors:
            self._require_int8(t, "CONCATENATION")
            if (t.scale, t.zero_point) != (first.scale, first.zero_point):
                raise ValueError(
                    "CONCATENATION inputs must share scale and zero point: "
                    f"{(t.scale, t.zero_point)} != {(first.scale, first.zero_point)}; "
                    "pass quant= to the producing ops"
                )
        axis = axis % len(first.shape)
        result = np.concatenate([self._values(t) for t in tensors], axis=axis + 1)
        out = self._activation_tensor("CONCATENATION", result, (first.scale, first.zero_point))

        def options(fb: flatbuffers.Builder) -> int:
            tflite.ConcatenationOptionsStart(fb)
            tflite.ConcatenationOptionsAddAxis(fb, axis)
            tflite.ConcatenationOptionsAddFusedActivationFunction(fb, ACTIVATIONS["NONE"])
            return tflite.ConcatenationOptionsEnd(fb)

        self._add_op(OP.CONCATENATION, [t.index for t in tensors], [out.index],
                     tflite.BuiltinOptions.ConcatenationOptions, options)
        return out

    def softmax(self, x: TensorRef, *, beta: float = 1.0) -> TensorRef:
        """SOFTMAX over the last axis; output scale 1/256, zero point -128 as TFLite requires."""
        self._require_int8(x, "SOFTMAX")
        values = self._values(x) * beta
        exp = np.exp(values - values.max(axis=-1, keepdims=True))
        out = self._activation_tensor(
            "SOFTMAX", exp / exp.sum(axis=-1, keepdims=True), (1.0 / 256.0, -128)
        )

        def options(fb: flatbuffers.Builder) -> int:
            tflite.SoftmaxOptionsStart(fb)
            tflite.SoftmaxOptionsAddBeta(fb, beta)
            return tflite.SoftmaxOptionsEnd(fb)

        self._add_op(OP.SOFTMAX, [x.index], [out.index],
                     tflite.BuiltinOptions.SoftmaxOptions, options)
        return out

    # Serialization

    def finish(self) -> bytes:
        """Serializes the graph as a .tflite flatbuffer (identifier TFL3, schema version 3)."""
        if not self._inputs or not self._outputs:
            raise ValueError("the model needs at least one input and one output")
        fb = flatbuffers.Builder(1024)

        buffer_offsets = []
        for data in self._buffers:
            data_offset = None
            if data:
                # 16-byte aligned constant data, so kernels may read it in place.
                fb.StartVector(1, len(data), 16)
                fb.head -= len(data)
                fb.Bytes[fb.head : fb.head + len(data)] = data
                data_offset = fb.EndVector()
            tflite.BufferStart(fb)
            if data_offset is not None:
                tflite.BufferAddData(fb, data_offset)
            buffer_offsets.append(tflite.BufferEnd(fb))

        tensor_offsets = []
        for tensor in self._tensors:
            name = fb.CreateString(tensor.name)
            shape = fb.CreateNumpyVector(np.array(tensor.shape, np.int32))
            quantization = None
            if tensor.scales is not None:
                scales = fb.CreateNumpyVector(tensor.scales.astype(np.float32))
                zero_points = fb.CreateNumpyVector(tensor.zero_points.astype(np.int64))
                tflite.QuantizationParametersStart(fb)
                tflite.QuantizationParametersAddScale(fb, scales)
                tflite.QuantizationParametersAddZeroPoint(fb, zero_points)
                tflite.QuantizationParametersAddQuantizedDimension(
                    fb, tensor.quantized_dimension
                )
                quantization = tflite.QuantizationParametersEnd(fb)
            tflite.TensorStart(fb)
            tflite.TensorAddShape(fb, shape)
            tflite.TensorAddType(fb, TENSOR_TYPES[tensor.dtype])
            tflite.TensorAddBuffer(fb, tensor.buffer)
            tflite.TensorAddName(fb, name)
            if quantization is not None:
                tflite.TensorAddQuantization(fb, quantization)
            tensor_offsets.append(tflite.TensorEnd(fb))

        codes = sorted({op.code for op in self._operators})
        code_index = {code: i for i, code in enumerate(codes)}
        operator_offsets = []
        for op in self._operators:
            inputs = fb.CreateNumpyVector(np.array(op.inputs, np.int32))
            outputs = fb.CreateNumpyVector(np.array(op.outputs, np.int32))
            options = op.options(fb) if op.options is not None else None
            tflite.OperatorStart(fb)
            tflite.OperatorAddOpcodeIndex(fb, code_index[op.code])
            tflite.OperatorAddInputs(fb, inputs)
            tflite.OperatorAddOutputs(fb, outputs)
            if options is not None:
                tflite.OperatorAddBuiltinOptionsType(fb, op.options_type)
                tflite.OperatorAddBuiltinOptions(fb, options)
            operator_offsets.append(tflite.OperatorEnd(fb))

        def table_vector(offsets: list[int]) -> int:
            fb.StartVector(4, len(offsets), 4)
            for offset in reversed(offsets):
                fb.PrependUOffsetTRelative(offset)
            return fb.EndVector()

        tensors = table_vector(tensor_offsets)
        operators = table_vector(operator_offsets)
        inputs = fb.CreateNumpyVector(np.array(self._inputs, np.int32))
        outputs = fb.CreateNumpyVector(np.array(self._outputs, np.int32))
        subgraph_name = fb.CreateString("main")
        tflite.SubGraphStart(fb)
        tflite.SubGraphAddTensors(fb, tensors)
        tflite.SubGraphAddInputs(fb, inputs)
        tflite.SubGraphAddOutputs(fb, outputs)
        tflite.SubGraphAddOperators(fb, operators)
        tflite.SubGraphAddName(fb, subgraph_name)
        subgraphs = table_vector([tflite.SubGraphEnd(fb)])

        code_offsets = []
        for code in codes:
            tflite.OperatorCodeStart(fb)
            tflite.OperatorCodeAddDeprecatedBuiltinCode(fb, min(code, 127))
            tflite.OperatorCodeAddBuiltinCode(fb, code)
            tflite.OperatorCodeAddVersion(fb, OP_VERSIONS[code])
            code_offsets.append(tflite.OperatorCodeEnd(fb))
        operator_codes = table_vector(code_offsets)
        buffers = table_vector(buffer_offsets)
        description = fb.CreateString("npugen tests/tflite_builder.py")

        tflite.ModelStart(fb)
        tflite.ModelAddVersion(fb, 3)
        tflite.ModelAddOperatorCodes(fb, operator_codes)
        tflite.ModelAddSubgraphs(fb, subgraphs)
        tflite.ModelAddDescription(fb, description)
        tflite.ModelAddBuffers(fb, buffers)
        fb.Finish(tflite.ModelEnd(fb), file_identifier=b"TFL3")
        return bytes(fb.Output())
