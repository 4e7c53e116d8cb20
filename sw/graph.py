"""The model as the compiler sees it: layers in execution order, with clamp activations.

Layers: :class:`Dense` (on a vector, or on a feature map it flattens in C·H·W order),
:class:`Conv` (2-D convolution, or depthwise with one filter per channel),
:class:`Pool` (max, average, global average) and :class:`Add` (two tensors, a residual
connection). A layer's output tensor is named after the layer; ``inputs`` names the
tensors it reads (``"input"`` is the model's input; empty: the previous layer's output).
Importers (ONNX, TFLite, ``.npz``) produce a :class:`Model`; layers may carry float
weights (to be quantized from calibration data) or pre-quantized ones (QDQ and TFLite
models), and tensors may carry the quantization an imported model prescribes. A model
also says whose arithmetic it follows (:attr:`Model.framework`), how its input and output
are laid out and typed, and which operators after the NPU's last layer run on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .featuremap import conv_output_size, stride_pair

__all__ = ["QuantParams", "Dense", "Conv", "Pool", "Add", "Layer", "Model", "ModelError",
           "output_shape", "FRAMEWORKS", "HOST_OPS"]

#: The operators a model may leave to the host after its last NPU layer (``Model.host_ops``),
#: and whose arithmetic each follows (sw/runtime.py ``apply_host_ops``).
HOST_OPS = {
    "softmax": "TFLite's int8 reference kernel, in its fixed-point arithmetic",
    "float_softmax": "ONNX's float Softmax between DequantizeLinear and QuantizeLinear",
}

#: Whose integer arithmetic a model's layers follow: ``npugen`` (models npugen quantizes
#: itself), ``onnx`` (QDQ: one rounding of the rescaled product) or ``tflite`` (LiteRT's
#: reference kernels: two roundings in convolutions and adds, one in FULLY_CONNECTED, and
#: average pooling as a rounded integer division).
FRAMEWORKS = ("npugen", "onnx", "tflite")


class ModelError(ValueError):
    """A model npugen cannot take: the message names the node or layer and the reason."""


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization ``real = scale · (q − zero_point)``; per-channel if arrays."""

    scale: np.ndarray | float
    zero_point: np.ndarray | int = 0

    def quantize(self, values: np.ndarray, bits: int = 8) -> np.ndarray:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = np.round(np.asarray(values, dtype=np.float64) / self.scale) + self.zero_point
        return np.clip(q, low, high).astype(np.int64)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((np.asarray(q, dtype=np.float64) - self.zero_point) * self.scale).astype(
            np.float32)


class WeightShape:
    """``in_features``/``out_features`` of a layer with a (K, N) ``weight``."""

    weight: np.ndarray

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]


@dataclass
class Dense(WeightShape):
    """``y = clamp(x · weight + bias, low, high)`` with weight (K, N).

    ``low``/``high`` are the activation's float bounds (ReLU: 0, ∞; ReLU6: 0, 6).
    Pre-quantized layers also carry ``quantized_weight`` (int8, K×N), ``weight_quant``
    (per-channel scales, zero points 0) and ``quantized_bias`` (int32); ``clamp``, when
    set, gives the int8 output bounds as the model's framework computed them.
    """

    name: str
    weight: np.ndarray
    bias: np.ndarray
    low: float = -np.inf
    high: float = np.inf
    quantized_weight: np.ndarray | None = None
    weight_quant: QuantParams | None = None
    quantized_bias: np.ndarray | None = None
    inputs: tuple[str, ...] = ()
    clamp: tuple[int, int] | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1)
        y = x.astype(np.float64) @ self.weight.astype(np.float64) + self.bias
        return np.clip(y, self.low, self.high).astype(np.float32)


def _windows(x: np.ndarray, kernel: tuple[int, int], stride: int | tuple[int, int],
             pads: tuple[int, int, int, int], fill: float) -> np.ndarray:
    """(N, C, H, W) → (N, C, OH, OW, kh, kw) views of the padded input's windows."""
    top, left, bottom, right = pads
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)
    views = np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=(2, 3))
    step_y, step_x = stride_pair(stride)
    return views[:, :, ::step_y, ::step_x]


@dataclass
class Conv:
    """``y = clamp(conv2d(x, weight) + bias, low, high)`` on a C×H×W map.

    ``weight`` is (kh, kw, C_in, C_out), or (kh, kw, C) for a depthwise convolution (one
    filter per channel). ``stride``: one, or (vertical, horizontal); ``pads`` are (top,
    left, bottom, right); dilation is 1.
    """

    name: str
    weight: np.ndarray
    bias: np.ndarray
    stride: int | tuple[int, int] = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    depthwise: bool = False
    low: float = -np.inf
    high: float = np.inf
    quantized_weight: np.ndarray | None = None
    weight_quant: QuantParams | None = None
    quantized_bias: np.ndarray | None = None
    inputs: tuple[str, ...] = ()
    clamp: tuple[int, int] | None = None

    @property
    def kernel(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[2]

    @property
    def out_features(self) -> int:
        """Output channels."""
        return self.weight.shape[2] if self.depthwise else self.weight.shape[3]

    def forward(self, x: np.ndarray) -> np.ndarray:
        windows = _windows(x.astype(np.float64), self.kernel, self.stride, self.pads, 0.0)
        spec = "ncyxhw,hwc->ncyx" if self.depthwise else "ncyxhw,hwcd->ndyx"
        y = np.einsum(spec, windows, self.weight.astype(np.float64))
        y = y + self.bias.reshape(1, -1, 1, 1)
        return np.clip(y, self.low, self.high).astype(np.float32)


@dataclass
class Pool:
    """Max or average pooling over ``kernel`` windows (an int for a square one, or
    (height, width)), or ``global`` average pooling (a 1×1 output). Average pooling counts
    the padding (count_include_pad) except in TFLite models, whose reference kernel divides
    by the number of input pixels under the window. ``clamp``: int8 output bounds."""

    name: str
    kind: str                      # "max", "avg" or "global"
    kernel: int | tuple[int, int] = 1
    stride: int | tuple[int, int] = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    inputs: tuple[str, ...] = ()
    clamp: tuple[int, int] | None = None

    @property
    def window(self) -> tuple[int, int]:
        """(height, width) of the window."""
        if isinstance(self.kernel, tuple):
            return int(self.kernel[0]), int(self.kernel[1])
        return int(self.kernel), int(self.kernel)

    def forward(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        if self.kind == "global":
            return x.mean(axis=(2, 3), keepdims=True).astype(np.float32)
        fill = -np.inf if self.kind == "max" else 0.0
        windows = _windows(x, self.window, self.stride, self.pads, fill)
        reduce = np.max if self.kind == "max" else np.mean
        return reduce(windows, axis=(4, 5)).astype(np.float32)


@dataclass
class Add:
    """``y = clamp(a + b, low, high)`` of two tensors of one shape (``inputs`` names them)."""

    name: str
    inputs: tuple[str, ...]
    low: float = -np.inf
    high: float = np.inf
    clamp: tuple[int, int] | None = None

    def forward(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        y = a.astype(np.float64) + b.astype(np.float64)
        return np.clip(y, self.low, self.high).astype(np.float32)


Layer = Dense | Conv | Pool | Add


def output_shape(layer: Layer, shape: tuple[int, ...],
                 other: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The shape a layer makes from an input of ``shape`` (no batch dimension; ``other``:
    an Add's second input); raises :class:`ModelError` if the layer cannot take it."""
    if isinstance(layer, Add):
        if other is not None and tuple(other) != tuple(shape):
            raise ModelError(f"layer {layer.name!r} adds tensors of shapes {shape} and "
                             f"{other}; they must be equal (no broadcasting)")
        return tuple(shape)
    if isinstance(layer, Dense):
        if layer.in_features != int(np.prod(shape)):
            raise ModelError(f"layer {layer.name!r} takes {layer.in_features} features but "
                             f"receives {int(np.prod(shape))} (shape {shape})")
        return (layer.out_features,)
    if len(shape) != 3:
        raise ModelError(f"layer {layer.name!r} needs a C×H×W feature map, not shape {shape}")
    channels, height, width = shape
    if isinstance(layer, Pool) and layer.kind == "global":
        return (channels, 1, 1)
    if isinstance(layer, Conv):
        (kh, kw), stride = layer.kernel, layer.stride
        if layer.in_channels != channels:
            raise ModelError(f"layer {layer.name!r} takes {layer.in_channels} channels but "
                             f"receives {channels}")
        channels = layer.out_features
    else:
        (kh, kw), stride = layer.window, layer.stride
    top, left, bottom, right = layer.pads
    step_y, step_x = stride_pair(stride)
    out_h = conv_output_size(height, kh, step_y, top, bottom)
    out_w = conv_output_size(width, kw, step_x, left, right)
    if out_h < 1 or out_w < 1:
        raise ModelError(f"layer {layer.name!r}: a {kh}×{kw} window does not fit its "
                         f"{height}×{width} input")
    return (channels, out_h, out_w)


@dataclass
class Model:
    """A chain of layers from one input to one output.

    ``tensor_quant`` holds the quantization a QDQ or TFLite model prescribes for the
    input (key ``"input"``) and for each layer's output (key: the layer's name).
    ``input_shape`` is C×H×W for feature maps, as the NPU computes; ``input_layout``
    ``"hwc"`` says the user gives them H×W×C (TFLite's NHWC), and ``output_layout`` the
    same for a map output. ``input_dtype``/``output_dtype``: ``float32`` or ``int8``, the
    types of the model's own graph input and output. ``host_ops``: operators after the
    last layer that the host computes (e.g. ``{"op": "softmax", ...}``), in order.
    """

    layers: list[Layer]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_name: str = "input"
    output_name: str = "output"
    tensor_quant: dict[str, QuantParams] = field(default_factory=dict)
    framework: str = "npugen"
    input_layout: str = "chw"
    output_layout: str = "chw"
    input_dtype: str = "float32"
    output_dtype: str = "float32"
    host_ops: list[dict] = field(default_factory=list)

    @property
    def prequantized(self) -> bool:
        return bool(self.tensor_quant)

    @property
    def has_maps(self) -> bool:
        """Whether any layer works on feature maps (so the model compiles as a CNN)."""
        return any(not isinstance(layer, Dense) for layer in self.layers)

    def input_names(self, index: int) -> tuple[str, ...]:
        """The tensors layer ``index`` reads."""
        layer = self.layers[index]
        if layer.inputs:
            return tuple(layer.inputs)
        return ("input",) if index == 0 else (self.layers[index - 1].name,)

    def evaluate(self, x, apply) -> list:
        """Run ``apply(layer, *inputs)`` over the layers from ``x``; each layer's result,
        the model's input first."""
        values = {"input": x}
        results = [x]
        for index, layer in enumerate(self.layers):
            names = self.input_names(index)
            missing = [name for name in names if name not in values]
            if missing:
                raise ModelError(f"layer {layer.name!r} reads {', '.join(missing)}, which no "
                                 f"earlier layer makes")
            values[layer.name] = apply(layer, *(values[name] for name in names))
            results.append(values[layer.name])
        return results

    def shapes(self) -> list[tuple[int, ...]]:
        """The input shape, then each layer's output shape."""
        return self.evaluate(tuple(self.input_shape),
                             lambda layer, *shapes: output_shape(layer, *shapes))

    def forward(self, x: np.ndarray, *, every: bool = False):
        """Float inference: x has a leading batch dimension and ``input_shape``; with
        ``every``, every layer's output (the input first)."""
        x = np.asarray(x, dtype=np.float32).reshape(len(x), *self.input_shape)
        results = self.evaluate(x, lambda layer, *values: layer.forward(*values))
        if every:
            return results
        return results[-1].reshape((len(x), *self.output_shape))

    def check(self) -> None:
        """Shapes chain, values are finite."""
        if not self.layers:
            raise ModelError("the model has no layer the NPU computes (Gemm, MatMul or Conv)")
        shapes = self.shapes()
        for layer in self.layers:
            for what in ("weight", "bias"):
                values = getattr(layer, what, None)
                if values is not None and not np.all(np.isfinite(values)):
                    raise ModelError(f"layer {layer.name!r} has NaN or infinite {what}s")
        if int(np.prod(self.output_shape)) != int(np.prod(shapes[-1])):
            raise ModelError(f"the model's output shape {self.output_shape} does not match "
                             f"its last layer's {shapes[-1]}")
