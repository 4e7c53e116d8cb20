"""TFLite front end: a full-integer int8 ``.tflite`` model as a :class:`~npugen.graph.Model`.

The file is read with the ``tflite`` package (the flatbuffer schema's Python bindings; no
TensorFlow). Tensors stay in TFLite's quantization (per-channel int8 weights, int32
biases, per-tensor int8 activations); NHWC maps become the C×H×W maps the NPU computes,
and the program converts a user's NHWC input and output. The model follows TFLite's
arithmetic (``framework = "tflite"``, see :mod:`npugen.quantize`): exactly what LiteRT's
reference kernels compute.

One handler per operator (:data:`HANDLERS`); the graph passes (:mod:`npugen.passes`)
fold RELU, RELU6 and RELU_N1_TO_1 into the layer before them, a TRANSPOSE between NCHW
and NHWC at the graph's edges into the order of the user's input or output, and make a
whole-map average pooling a global one. RESHAPE, SQUEEZE, QUANTIZE and DEQUANTIZE at
the graph's edges and PAD before a convolution cost nothing on the NPU; a final SOFTMAX
runs on the host (:mod:`npugen.tflite_kernels`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .featuremap import same_pads
from .graph import Add, Conv, Dense, Model, ModelError, Pool, QuantParams, output_shape
from .passes import Activation, Graph, Layout, run_passes

__all__ = ["load_tflite", "SUPPORTED_TFLITE_OPS", "activation_range"]

INT8, INT32, FLOAT32 = 9, 2, 0
_TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 7: "int16",
               9: "int8", 10: "float64", 17: "int4"}
#: Padding values of Conv2DOptions, DepthwiseConv2DOptions and Pool2DOptions.
SAME, VALID = 0, 1
#: ActivationFunctionType → bounds in real values.
_ACTIVATIONS = {0: (None, None), 1: (0.0, None), 2: (-1.0, 1.0), 3: (0.0, 6.0)}


def activation_range(code: int, scale: float, zero_point: int) -> tuple[int, int]:
    """TFLite's CalculateActivationRangeQuantized for int8: the bounds quantized as
    zero_point + round(f / scale), the division in float32, rounding half away from 0."""
    if code not in _ACTIVATIONS:
        raise ModelError(f"fused activation {code} (TANH, SIGN_BIT, ...) is not supported; "
                         f"npugen fuses NONE, RELU, RELU_N1_TO_1 and RELU6")
    low, high = _ACTIVATIONS[code]

    def quantize(value: float) -> int:
        q = np.float32(value) / np.float32(scale)
        return int(zero_point) + int(np.sign(q) * np.floor(np.abs(q) + np.float32(0.5)))

    return (-128 if low is None else max(-128, quantize(low)),
            127 if high is None else min(127, quantize(high)))


@dataclass
class _Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: int
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    axis: int
    data: np.ndarray | None

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES.get(self.dtype, f"type {self.dtype}")

    def quant(self) -> QuantParams:
        """Per-tensor quantization of an activation."""
        if self.scale is None or self.scale.size != 1:
            raise ModelError(f"tensor {self.name!r} needs one scale and zero point (per-tensor "
                             f"int8), not {0 if self.scale is None else self.scale.size}")
        return QuantParams(float(self.scale[0]), int(self.zero_point[0]))


@dataclass
class _Operator:
    index: int
    name: str            # the builtin operator's name, e.g. CONV_2D
    inputs: list[int]    # tensor indices, -1 for an omitted optional input
    outputs: list[int]
    options: object | None

    def describe(self, tensors: list[_Tensor]) -> str:
        out = tensors[self.outputs[0]].name if self.outputs else "?"
        return f"operator {self.index} ({self.name}, output {out!r})"


@dataclass
class _Value:
    """An activation tensor as the graph sees it: the graph tensor that holds it
    (``"input"`` or a layer's name), its NPU shape (C, H, W or F,) and, after a RESHAPE
    that flattens a map, the map it came from (H·W·C order in TFLite)."""

    owner: str
    shape: tuple[int, ...]
    flattened_from: tuple[int, int, int] | None = None
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)   # a PAD waiting for its convolution


@dataclass
class _Builder:
    tensors: list[_Tensor]
    label: str
    layers: list = field(default_factory=list)
    values: dict[int, _Value] = field(default_factory=dict)
    tensor_quant: dict[str, QuantParams] = field(default_factory=dict)
    host_ops: list[dict] = field(default_factory=list)
    names: set[str] = field(default_factory=lambda: {"input"})
    consumers: dict[int, int] = field(default_factory=dict)
    final_tensor: int | None = None   # the tensor whose value the NPU delivers
    output_dtype: str = "int8"

    def fail(self, op: _Operator, reason: str) -> ModelError:
        return ModelError(f"{self.label}: {op.describe(self.tensors)}: {reason}")

    def value(self, op: _Operator, position: int = 0) -> _Value:
        index = op.inputs[position]
        if index not in self.values:
            tensor = self.tensors[index]
            what = "a constant" if tensor.data is not None else "not computed by the NPU"
            raise self.fail(op, f"its input {tensor.name!r} is {what}; npugen needs it to be "
                                f"the running activation")
        value = self.values[index]
        layout = next((layer for layer in self.layers if isinstance(layer, Layout)
                       and layer.name == value.owner and layer.inputs != ("input",)), None)
        if layout is not None and op.name != "DEQUANTIZE":   # its shape is in the other order
            raise layout.misplaced()
        if any(value.pads) and op.name not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            raise self.fail(op, "it reads the output of a PAD; npugen folds a PAD into the "
                                "convolution after it only")
        return value

    def constant(self, op: _Operator, position: int, what: str) -> _Tensor | None:
        if position >= len(op.inputs) or op.inputs[position] < 0:
            return None
        tensor = self.tensors[op.inputs[position]]
        if tensor.data is None:
            raise self.fail(op, f"its {what} ({tensor.name!r}) must be a constant")
        return tensor

    def name_for(self, op: _Operator) -> str:
        base = _layer_name(self.tensors[op.outputs[0]].name) or f"{op.name.lower()}_{op.index}"
        name = base
        while name in self.names:
            name = f"{base}#{op.index}"
        self.names.add(name)
        return name

    def int8_output(self, op: _Operator) -> _Tensor:
        tensor = self.tensors[op.outputs[0]]
        if tensor.dtype != INT8:
            raise self.fail(op, f"its output is {tensor.type_name}; npugen runs full-integer "
                                f"int8 models (convert with full-integer quantization)")
        return tensor

    def add_layer(self, op: _Operator, layer, source: _Value) -> None:
        """Append ``layer`` reading ``source``; its output tensor is the operator's."""
        try:
            shape = output_shape(layer, source.shape)
        except ModelError as error:
            raise self.fail(op, str(error)) from None
        out = self.int8_output(op)
        expected = _npu_shape(out.shape)
        if int(np.prod(shape)) != int(np.prod(expected)):
            raise self.fail(op, f"npugen computes an output of shape {shape}, the model "
                                f"says {out.shape}")
        self.layers.append(layer)
        self.tensor_quant[layer.name] = out.quant()
        self.values[op.outputs[0]] = _Value(layer.name, shape)


def _layer_name(tensor_name: str) -> str:
    """A short layer name from a converter's tensor name, which joins the names of the
    fused ops with ';': the scope of the ``.../BiasAdd`` among them, else the last."""
    parts = [part for part in tensor_name.split(";") if part]
    for part in parts:
        if part.endswith("/BiasAdd"):
            return part[:-len("/BiasAdd")]
    return parts[-1] if parts else ""


def _npu_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A TFLite shape with its batch of 1 as the NPU's: NHWC → (C, H, W), (1, F) → (F,)."""
    dims = tuple(int(d) for d in shape)
    if len(dims) == 4:
        return (dims[3], dims[1], dims[2])
    if len(dims) >= 2:
        return (int(np.prod(dims[1:])),)
    return dims


def _window(b: _Builder, op: _Operator, source: _Value, kernel: tuple[int, int],
            padding: int, stride: tuple[int, int]
            ) -> tuple[int | tuple[int, int], tuple[int, int, int, int]]:
    """The stride (one, or vertical and horizontal) and the (top, left, bottom, right)
    pads of a window operator."""
    if len(source.shape) != 3:
        raise b.fail(op, f"needs a feature map (N, H, W, C), not shape {source.shape}")
    _, height, width = source.shape
    pads = same_pads((height, width), kernel, stride) if padding == SAME else (0, 0, 0, 0)
    pads = tuple(p + q for p, q in zip(pads, source.pads, strict=True))
    out_h = (height + pads[0] + pads[2] - kernel[0]) // stride[0] + 1
    out_w = (width + pads[1] + pads[3] - kernel[1]) // stride[1] + 1
    # A stride along an axis with one output does not matter.
    step_y = stride[0] if out_h > 1 else stride[1]
    step_x = stride[1] if out_w > 1 else step_y
    return (step_y if step_y == step_x else (step_y, step_x)), pads


def _activation_clamp(b: _Builder, op: _Operator, code: int) -> tuple[int, int]:
    quant = b.int8_output(op).quant()
    try:
        return activation_range(code, quant.scale, quant.zero_point)
    except ModelError as error:
        raise b.fail(op, str(error)) from None


def _weights(b: _Builder, op: _Operator, position: int, axis_expected: int,
             channels: int) -> tuple[np.ndarray, QuantParams, np.ndarray]:
    """int8 weights, their per-output-channel quantization (zero points 0) and the real
    values."""
    tensor = b.constant(op, position, "weights")
    if tensor.dtype != INT8:
        raise b.fail(op, f"its weights are {tensor.type_name}, not int8")
    if tensor.scale is None:
        raise b.fail(op, "its weights have no quantization")
    if np.any(tensor.zero_point != 0):
        raise b.fail(op, "its weights have nonzero zero points; int8 weights are symmetric")
    if tensor.scale.size > 1 and tensor.axis != axis_expected:
        raise b.fail(op, f"its per-channel weight scales are along axis {tensor.axis}, not "
                         f"the output channels (axis {axis_expected})")
    scale = np.broadcast_to(tensor.scale.astype(np.float64), (channels,)).copy()
    q = tensor.data.astype(np.int64)
    shape = [1] * q.ndim
    shape[axis_expected] = -1
    real = (q * (scale.reshape(shape) if tensor.scale.size > 1 else scale[0])).astype(
        np.float32)
    return q, QuantParams(scale, np.zeros(channels, dtype=np.int64)), real


def _bias(b: _Builder, op: _Operator, channels: int, input_scale: float,
          weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 bias, real bias); zeros when the operator has none."""
    tensor = b.constant(op, 2, "bias")
    if tensor is None:
        return np.zeros(channels, dtype=np.int64), np.zeros(channels, dtype=np.float32)
    if tensor.dtype != INT32 or tensor.data.size != channels:
        raise b.fail(op, f"its bias must be {channels} int32 values, not {tensor.data.size} "
                         f"{tensor.type_name}")
    q = tensor.data.reshape(-1).astype(np.int64)
    return q, (q * input_scale * weight_scale).astype(np.float32)


def _conv(b: _Builder, op: _Operator) -> None:
    source = b.value(op)
    options = op.options
    if options.DilationWFactor() != 1 or options.DilationHFactor() != 1:
        raise b.fail(op, "dilated convolutions are not supported")
    q, weight_quant, real = _weights(b, op, 1, 0, b.tensors[op.inputs[1]].shape[0])
    out_channels, kh, kw, in_channels = q.shape
    if len(source.shape) != 3 or in_channels != source.shape[0]:
        raise b.fail(op, f"filters take {in_channels} channels, the input has shape "
                         f"{source.shape} (grouped convolutions are not supported)")
    stride, pads = _window(b, op, source, (kh, kw), options.Padding(),
                           (options.StrideH(), options.StrideW()))
    input_quant = b.tensor_quant[source.owner]
    bias_q, bias = _bias(b, op, out_channels, input_quant.scale, weight_quant.scale)
    layer = Conv(b.name_for(op), real.transpose(1, 2, 3, 0), bias, stride, pads,
                 quantized_weight=q.transpose(1, 2, 3, 0), weight_quant=weight_quant,
                 quantized_bias=bias_q, inputs=(source.owner,),
                 clamp=_activation_clamp(b, op, options.FusedActivationFunction()))
    b.add_layer(op, layer, source)


def _depthwise(b: _Builder, op: _Operator) -> None:
    source = b.value(op)
    options = op.options
    if options.DilationWFactor() != 1 or options.DilationHFactor() != 1:
        raise b.fail(op, "dilated convolutions are not supported")
    filters = b.tensors[op.inputs[1]].shape
    q, weight_quant, real = _weights(b, op, 1, 3, filters[3])
    _, kh, kw, out_channels = q.shape
    if len(source.shape) != 3 or out_channels % source.shape[0]:
        raise b.fail(op, f"{out_channels} filters do not fit an input of shape "
                         f"{source.shape}")
    channels = source.shape[0]
    multiplier = out_channels // channels
    stride, pads = _window(b, op, source, (kh, kw), options.Padding(),
                           (options.StrideH(), options.StrideW()))
    input_quant = b.tensor_quant[source.owner]
    bias_q, bias = _bias(b, op, out_channels, input_quant.scale, weight_quant.scale)
    clamp = _activation_clamp(b, op, options.FusedActivationFunction())
    name = b.name_for(op)
    if multiplier == 1:
        layer = Conv(name, real[0], bias, stride, pads, depthwise=True, quantized_weight=q[0],
                     weight_quant=weight_quant, quantized_bias=bias_q,
                     inputs=(source.owner,), clamp=clamp)
    else:
        # Depth multiplier M: output channel c·M + m reads input channel c only; as a full
        # convolution whose weights are zero elsewhere.
        dense_q = np.zeros((kh, kw, channels, out_channels), dtype=np.int64)
        dense_real = np.zeros(dense_q.shape, dtype=np.float32)
        for out in range(out_channels):
            dense_q[:, :, out // multiplier, out] = q[0, :, :, out]
            dense_real[:, :, out // multiplier, out] = real[0, :, :, out]
        layer = Conv(name, dense_real, bias, stride, pads, quantized_weight=dense_q,
                     weight_quant=weight_quant, quantized_bias=bias_q,
                     inputs=(source.owner,), clamp=clamp)
    b.add_layer(op, layer, source)


def _fully_connected(b: _Builder, op: _Operator) -> None:
    source = b.value(op)
    options = op.options
    if options is not None and options.KeepNumDims():
        raise b.fail(op, "keep_num_dims is not supported")
    if options is not None and options.WeightsFormat() != 0:
        raise b.fail(op, "shuffled weights are not supported")
    units = b.tensors[op.inputs[1]].shape[0]
    q, weight_quant, real = _weights(b, op, 1, 0, units)
    features = q.shape[1]
    if features != int(np.prod(source.shape)):
        raise b.fail(op, f"its weights take {features} features, its input has "
                         f"{int(np.prod(source.shape))}")
    # npugen flattens a map C·H·W; TFLite flattened it H·W·C: reorder the weight rows.
    order = np.arange(features)
    flat = source.flattened_from or (source.shape if len(source.shape) == 3 else None)
    if flat is not None:
        channels, height, width = flat
        order = np.arange(features).reshape(height, width, channels).transpose(2, 0, 1)
        order = order.reshape(-1)
    owner_shape = flat if flat is not None else source.shape
    input_quant = b.tensor_quant[source.owner]
    bias_q, bias = _bias(b, op, units, input_quant.scale, weight_quant.scale)
    code = options.FusedActivationFunction() if options is not None else 0
    layer = Dense(b.name_for(op), real.T[order], bias, quantized_weight=q.T[order],
                  weight_quant=weight_quant, quantized_bias=bias_q, inputs=(source.owner,),
                  clamp=_activation_clamp(b, op, code))
    b.add_layer(op, layer, _Value(source.owner, owner_shape))


def _add(b: _Builder, op: _Operator) -> None:
    first, second = b.value(op, 0), b.value(op, 1)
    if first.shape != second.shape:
        raise b.fail(op, f"adds shapes {first.shape} and {second.shape}; npugen adds tensors "
                         f"of one shape (no broadcasting)")
    code = op.options.FusedActivationFunction() if op.options is not None else 0
    layer = Add(b.name_for(op), (first.owner, second.owner),
                clamp=_activation_clamp(b, op, code))
    b.add_layer(op, layer, first)


def _pool(kind: str) -> Callable[[_Builder, _Operator], None]:
    def handler(b: _Builder, op: _Operator) -> None:
        source = b.value(op)
        options = op.options
        kernel = (options.FilterHeight(), options.FilterWidth())
        stride, pads = _window(b, op, source, kernel, options.Padding(),
                               (options.StrideH(), options.StrideW()))
        clamp = _activation_clamp(b, op, options.FusedActivationFunction())
        layer = Pool(b.name_for(op), kind, kernel, stride, pads, inputs=(source.owner,),
                     clamp=clamp)
        b.add_layer(op, layer, source)
    return handler


def _activation(code: int) -> Callable[[_Builder, _Operator], None]:
    """RELU, RELU6 and RELU_N1_TO_1 as operators of their own: folded into the layer
    before them, whose output quantization they must keep."""
    def handler(b: _Builder, op: _Operator) -> None:
        source = b.value(op)
        out = b.int8_output(op).quant()
        if out != b.tensor_quant[source.owner]:
            raise b.fail(op, "its output quantization differs from its input's; npugen "
                             "folds an activation that keeps the quantization into the "
                             "layer before it")
        node = Activation(b.name_for(op), (source.owner,), f"{b.label}: "
                          f"{op.describe(b.tensors)}", clamp=_activation_clamp(b, op, code))
        b.layers.append(node)
        b.tensor_quant[node.name] = out
        b.values[op.outputs[0]] = _Value(node.name, source.shape, source.flattened_from)
    return handler


def _reshape(b: _Builder, op: _Operator) -> None:
    """RESHAPE and SQUEEZE: the same values under another shape. A map flattened to a
    vector is read by a FULLY_CONNECTED (which reorders its weights); 1×1 maps and vectors
    are interchangeable."""
    source = b.value(op)
    out = _npu_shape(b.tensors[op.outputs[0]].shape)
    if tuple(out) == tuple(source.shape):
        b.values[op.outputs[0]] = source
    elif len(out) == 1 and len(source.shape) == 3:
        flat = source.shape if source.shape[1:] != (1, 1) else None
        b.values[op.outputs[0]] = _Value(source.owner, out, flat)
    elif len(out) == 3 and out[1:] == (1, 1) and len(source.shape) == 1:
        b.values[op.outputs[0]] = _Value(source.owner, out)
    else:
        raise b.fail(op, f"reshapes {source.shape} (C, H, W) to {out}; npugen takes "
                         f"reshapes that flatten a map or drop 1-sized axes")


def _pad(b: _Builder, op: _Operator) -> None:
    source = b.value(op)
    paddings = b.constant(op, 1, "paddings").data.reshape(-1, 2).astype(int)
    if paddings.shape[0] != 4 or np.any(paddings[[0, 3]] != 0) or len(source.shape) != 3:
        raise b.fail(op, f"pads {paddings.tolist()}; npugen pads the height and width of a "
                         f"map only")
    out = b.tensors[op.outputs[0]].quant()
    if out != b.tensor_quant[source.owner]:
        raise b.fail(op, "its output quantization differs from its input's")
    pads = (paddings[1, 0], paddings[2, 0], paddings[1, 1], paddings[2, 1])
    b.values[op.outputs[0]] = _Value(source.owner, source.shape, source.flattened_from,
                                     tuple(int(p + q) for p, q in zip(pads, source.pads,
                                                                      strict=True)))


def _transpose(b: _Builder, op: _Operator) -> None:
    """TRANSPOSE between NCHW and NHWC at the graph's edges (as converters of PyTorch
    models write them): an NCHW input turned to NHWC, or a map turned to NCHW as the
    model's output; the graph passes fold it into the order the user gives or gets."""
    source = b.value(op)
    perm = [int(p) for p in b.constant(op, 1, "permutation").data.reshape(-1)]
    out = b.tensors[op.outputs[0]]
    if out.quant() != b.tensor_quant[source.owner]:
        raise b.fail(op, "its output quantization differs from its input's")
    at_input = source.owner == "input"
    rank = len(b.tensors[op.inputs[0]].shape)
    if rank == 4 and perm == [0, 2, 3, 1] and at_input:
        order, shape = ("chw", "hwc"), _npu_shape(out.shape)
    elif rank == 4 and perm == [0, 3, 1, 2] and not at_input:
        order, shape = ("hwc", "chw"), source.shape
    else:
        where = "the model's input" if at_input else f"the output of {source.owner!r}"
        raise b.fail(op, f"transposes {where} with perm {perm}; npugen takes a TRANSPOSE "
                         f"only as a layout change at the model's edges: NCHW → NHWC (perm "
                         f"[0, 2, 3, 1]) of the input, NHWC → NCHW (perm [0, 3, 1, 2]) of "
                         f"the output")
    name = f"layout {out.name}"
    b.layers.append(Layout(name, (source.owner,), f"{b.label}: {op.describe(b.tensors)}",
                           *order, shape))
    b.tensor_quant[name] = out.quant()
    b.values[op.outputs[0]] = _Value(name, shape)


def _softmax(b: _Builder, op: _Operator) -> None:
    source = b.value(op)
    in_quant = b.tensor_quant[source.owner]
    out = b.int8_output(op).quant()
    b.host_ops.append({"op": "softmax", "beta": float(op.options.Beta()),
                       "input_scale": in_quant.scale, "input_zero_point": in_quant.zero_point,
                       "output_scale": out.scale, "output_zero_point": out.zero_point})
    b.values[op.outputs[0]] = _Value(source.owner, source.shape, source.flattened_from)
    b.final_tensor = op.outputs[0]


def _dequantize(b: _Builder, op: _Operator) -> None:
    source = b.value(op)
    b.values[op.outputs[0]] = source
    b.output_dtype = "float32"


HANDLERS: dict[str, Callable[[_Builder, _Operator], None]] = {
    "CONV_2D": _conv,
    "DEPTHWISE_CONV_2D": _depthwise,
    "FULLY_CONNECTED": _fully_connected,
    "ADD": _add,
    "AVERAGE_POOL_2D": _pool("avg"),
    "MAX_POOL_2D": _pool("max"),
    "RELU": _activation(1),
    "RELU_N1_TO_1": _activation(2),
    "RELU6": _activation(3),
    "RESHAPE": _reshape,
    "SQUEEZE": _reshape,
    "PAD": _pad,
    "TRANSPOSE": _transpose,
    "SOFTMAX": _softmax,
    "DEQUANTIZE": _dequantize,
}
#: Operators the TFLite front end takes (QUANTIZE: after a float graph input).
SUPPORTED_TFLITE_OPS = tuple(HANDLERS) + ("QUANTIZE",)

_OPTIONS = {"CONV_2D": "Conv2DOptions", "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions",
            "FULLY_CONNECTED": "FullyConnectedOptions", "ADD": "AddOptions",
            "AVERAGE_POOL_2D": "Pool2DOptions", "MAX_POOL_2D": "Pool2DOptions",
            "SOFTMAX": "SoftmaxOptions"}


def _read(data: bytes, label: str) -> tuple[list[_Tensor], list[_Operator], list[int],
                                            list[int]]:
    import tflite
    from tflite.BuiltinOperator import BuiltinOperator

    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelError(f"{label} is not a TFLite flatbuffer (no TFL3 identifier); give a "
                         f".tflite file written by the TFLite converter")
    try:
        model = tflite.Model.GetRootAsModel(data, 0)
        if model.SubgraphsLength() != 1:
            raise ModelError(f"{label} has {model.SubgraphsLength()} subgraphs; npugen "
                             f"runs models with one")
        graph = model.Subgraphs(0)
        op_names = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
        tensors = []
        for i in range(graph.TensorsLength()):
            t = graph.Tensors(i)
            q = t.Quantization()
            scale = zero = None
            axis = 0
            if q is not None and q.ScaleLength():
                scale = q.ScaleAsNumpy().astype(np.float64)
                zero = (q.ZeroPointAsNumpy().astype(np.int64) if q.ZeroPointLength()
                        else np.zeros(scale.size, np.int64))
                axis = q.QuantizedDimension()
            shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            buffer = model.Buffers(t.Buffer())
            values = None
            if buffer is not None and buffer.DataLength():
                dtype = {INT8: np.int8, INT32: np.int32, FLOAT32: np.float32}.get(t.Type())
                raw = buffer.DataAsNumpy().tobytes()
                values = (np.frombuffer(raw, dtype=dtype).reshape(shape) if dtype is not None
                          else np.frombuffer(raw, dtype=np.uint8))
            elif buffer is not None and buffer.Offset() > 1:
                start = buffer.Offset()
                dtype = {INT8: np.int8, INT32: np.int32, FLOAT32: np.float32}.get(t.Type(),
                                                                                   np.uint8)
                values = np.frombuffer(data[start:start + buffer.Size()], dtype=dtype)
                if dtype is not np.uint8:
                    values = values.reshape(shape)
            name = t.Name().decode("utf-8", "replace") if t.Name() else f"tensor{i}"
            tensors.append(_Tensor(i, name, shape, t.Type(), scale, zero, axis, values))
        operators = []
        for i in range(graph.OperatorsLength()):
            o = graph.Operators(i)
            code = model.OperatorCodes(o.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            name = op_names.get(builtin, f"operator code {builtin}")
            if name == "CUSTOM" and code.CustomCode():
                name = f"CUSTOM {code.CustomCode().decode()}"
            options = None
            if name in _OPTIONS and o.BuiltinOptions() is not None:
                table = o.BuiltinOptions()
                options = getattr(tflite, _OPTIONS[name])()
                options.Init(table.Bytes, table.Pos)
            operators.append(_Operator(i, name, [int(x) for x in o.InputsAsNumpy()],
                                       [int(x) for x in o.OutputsAsNumpy()], options))
        inputs = [int(x) for x in graph.InputsAsNumpy()]
        outputs = [int(x) for x in graph.OutputsAsNumpy()]
    except ModelError:
        raise
    except Exception as error:   # flatbuffer decoding of a truncated or damaged file
        raise ModelError(f"{label} is not a readable TFLite model (corrupt or truncated?): "
                         f"{error}") from None
    return tensors, operators, inputs, outputs


def load_tflite(source: str | Path | bytes) -> Model:
    """Import a full-integer int8 TFLite model (a path or the file's bytes)."""
    if isinstance(source, bytes | bytearray):
        data, label = bytes(source), "the TFLite model"
    else:
        label = repr(str(source))
        try:
            data = Path(source).read_bytes()
        except OSError as error:
            raise ModelError(f"cannot read {label}: {error.strerror or error}") from None
    tensors, operators, inputs, outputs = _read(data, label)
    unsupported = [f"{op.describe(tensors)}" for op in operators
                   if op.name not in SUPPORTED_TFLITE_OPS]
    if unsupported:
        raise ModelError(f"{label} has {len(unsupported)} unsupported operator(s): "
                         f"{', '.join(unsupported)}. Supported: "
                         f"{', '.join(SUPPORTED_TFLITE_OPS)}")
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"{label} must have one input and one output, not {len(inputs)} "
                         f"and {len(outputs)}")
    b = _Builder(tensors, label)
    graph_input = tensors[inputs[0]]
    if graph_input.shape[:1] != (1,) or len(graph_input.shape) not in (2, 4):
        raise ModelError(f"{label}: input {graph_input.name!r} has shape {graph_input.shape}; "
                         f"npugen takes (1, features) or an NHWC map (1, H, W, C)")
    input_dtype = "int8"
    remaining = list(operators)
    if graph_input.dtype == FLOAT32:
        first = remaining[0] if remaining else None
        if first is None or first.name != "QUANTIZE" or first.inputs[0] != inputs[0]:
            raise ModelError(f"{label}: the float input {graph_input.name!r} must be read by "
                             f"a QUANTIZE (a full-integer model)")
        input_dtype, quantized = "float32", first.outputs[0]
        remaining = remaining[1:]
        b.tensor_quant["input"] = tensors[quantized].quant()
        b.values[quantized] = _Value("input", _npu_shape(graph_input.shape))
    elif graph_input.dtype == INT8:
        b.tensor_quant["input"] = graph_input.quant()
        b.values[inputs[0]] = _Value("input", _npu_shape(graph_input.shape))
    else:
        raise ModelError(f"{label}: input {graph_input.name!r} is {graph_input.type_name}; "
                         f"npugen takes int8 or float32 inputs")
    for op in remaining:
        if op.name == "QUANTIZE":
            raise ModelError(f"{label}: {op.describe(tensors)}: QUANTIZE is supported after a "
                             f"float graph input only")
        if b.final_tensor is not None and op.name != "DEQUANTIZE":
            raise ModelError(f"{label}: {op.describe(tensors)} follows the SOFTMAX; npugen "
                             f"runs a SOFTMAX as the model's last operator only")
        HANDLERS[op.name](b, op)
    if outputs[0] not in b.values:
        raise ModelError(f"{label}: the output {tensors[outputs[0]].name!r} is not computed "
                         f"from the input by the supported operators")
    if not b.layers:
        raise ModelError(f"{label} has no operator the NPU computes (CONV_2D, "
                         f"DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, pooling)")
    final = b.values[outputs[0]]
    if final.owner != b.layers[-1].name:
        raise ModelError(f"{label}: the output must be the last layer's ({b.layers[-1].name!r})")
    input_value = _npu_shape(graph_input.shape)
    out_shape = final.shape if final.flattened_from is None else (int(np.prod(final.shape)),)
    folded = run_passes(Graph(b.layers, input_value, b.tensor_quant,
                              input_layout="hwc" if len(input_value) == 3 else "chw",
                              output_layout="hwc" if len(out_shape) == 3 else "chw"))
    model = Model(folded.layers, folded.input_shape, tuple(out_shape),
                  input_name=graph_input.name, output_name=tensors[outputs[0]].name,
                  tensor_quant=folded.tensor_quant, framework="tflite",
                  input_layout=folded.input_layout, output_layout=folded.output_layout,
                  input_dtype=input_dtype, output_dtype=b.output_dtype, host_ops=b.host_ops)
    model.check()
    return model
