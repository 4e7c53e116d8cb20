"""Model importers: ONNX (float or QDQ) and a plain ``.npz`` of layer weights;
:func:`load_model` picks one by the file's suffix, and ``.tflite`` files go to
:func:`npugen.tflite_import.load_tflite`.

All return a :class:`~npugen.graph.Model`. Errors are :class:`~npugen.graph.ModelError`
and name the node (by name and op type) or the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .featuremap import same_pads
from .graph import Add, Conv, Dense, Model, ModelError, Pool, QuantParams, output_shape

__all__ = ["load_model", "load_onnx", "load_npz", "SUPPORTED_ONNX_OPS", "NPZ_LAYOUT"]

SUPPORTED_ONNX_OPS = ("Gemm", "MatMul", "Conv", "BatchNormalization", "MaxPool",
                      "AveragePool", "GlobalAveragePool", "ReduceMean", "Add", "Relu", "Clip",
                      "Flatten",
                      "Reshape", "Identity", "Constant", "QuantizeLinear", "DequantizeLinear",
                      "Transpose", "Softmax")
#: Operators that make or finish a layer the NPU computes.
LAYER_OPS = ("Gemm", "MatMul", "Conv", "BatchNormalization", "MaxPool", "AveragePool",
             "GlobalAveragePool", "ReduceMean", "Add", "Relu", "Clip")
#: Operators that move no value: a Softmax's input is traced back through them to a layer.
PASS_THROUGH_OPS = ("QuantizeLinear", "DequantizeLinear", "Identity", "Flatten", "Reshape")
#: What may follow a final Softmax (its output's quantization).
AFTER_SOFTMAX_OPS = ("QuantizeLinear", "DequantizeLinear", "Identity")
MIN_OPSET = 13

NPZ_LAYOUT = """\
An .npz for npugen holds, for layers i = 0, 1, ... in order:
  layers.{i}.weight      float (in_features, out_features)
  layers.{i}.bias        float (out_features,)            optional, zeros if absent
  layers.{i}.activation  'none', 'relu' or 'relu6'        optional, 'none' if absent
and optionally input_shape (ints; default (in_features of layer 0,))."""

#: ONNX element types of a float model input (onnx.TensorProto FLOAT, DOUBLE, FLOAT16,
#: BFLOAT16); an INT8 input is taken too, read by a DequantizeLinear.
FLOAT_INPUT_TYPES = (1, 11, 10, 16)

ACTIVATION_BOUNDS = {"none": (-np.inf, np.inf), "relu": (0.0, np.inf), "relu6": (0.0, 6.0)}


def load_model(path: str | Path) -> Model:
    """Load an ``.onnx``, ``.tflite`` or ``.npz`` model by its suffix."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {str(path)!r} does not exist")
    if path.is_dir():
        raise ModelError(f"model file {str(path)!r} is a directory; give a .onnx, .tflite "
                         f"or .npz file")
    if path.suffix.lower() == ".npz":
        return load_npz(path)
    if path.suffix.lower() == ".onnx":
        return load_onnx(path)
    if path.suffix.lower() == ".tflite":
        from .tflite_import import load_tflite

        return load_tflite(path)
    raise ModelError(f"model file {str(path)!r}: expected a .onnx, .tflite or .npz file")


# -- .npz --------------------------------------------------------------------------------

def load_npz(path: str | Path) -> Model:
    """A float model of dense layers from an ``.npz`` laid out as :data:`NPZ_LAYOUT` says;
    layers are read from ``layers.0`` up to the first index with no weight.

    Raises :class:`~npugen.graph.ModelError` if the file is not a readable ``.npz``, a
    weight is not 2-D, a bias has the wrong length, an activation is unknown, there is no
    ``layers.0.weight``, an entry is not one of those read (a misspelt field, a layer past a
    gap in the numbering) nor ``input_shape``, or the
    layers do not chain or hold NaN or infinite values (:meth:`~npugen.graph.Model.check`).
    """
    try:
        archive = np.load(path, allow_pickle=False)
        arrays = {name: archive[name] for name in archive.files}
    except Exception as error:  # zipfile, pickle and value errors all mean "corrupt"
        raise ModelError(f"{str(path)!r} is not a readable .npz archive: {error}") from None
    layers = []
    index = 0
    while f"layers.{index}.weight" in arrays:
        prefix = f"layers.{index}."
        weight = np.asarray(arrays[prefix + "weight"], dtype=np.float32)
        if weight.ndim != 2:
            raise ModelError(f"{prefix}weight must be 2-D (in, out), not {weight.shape}")
        bias = np.asarray(arrays.get(prefix + "bias", np.zeros(weight.shape[1])), np.float32)
        if bias.shape != (weight.shape[1],):
            raise ModelError(f"{prefix}bias must have {weight.shape[1]} values, not "
                             f"{bias.shape}")
        activation = str(arrays.get(prefix + "activation", np.array("none")))
        if activation not in ACTIVATION_BOUNDS:
            raise ModelError(f"{prefix}activation must be one of "
                             f"{', '.join(ACTIVATION_BOUNDS)}, not {activation!r}")
        low, high = ACTIVATION_BOUNDS[activation]
        layers.append(Dense(f"layer{index}", weight, bias, low, high))
        index += 1
    if not layers:
        raise ModelError(f"{str(path)!r} has no layers.0.weight\n{NPZ_LAYOUT}")
    # Every entry must have been read: a misspelt field ("layers.0.wieght") or a layer
    # past a gap in the numbering ("layers.2" after "layers.0") would otherwise be left
    # out of the model without a word.
    read = {f"layers.{i}.{field}" for i in range(index)
            for field in ("weight", "bias", "activation")}
    extra = sorted(k for k in arrays if k not in read and k != "input_shape")
    if extra:
        raise ModelError(f"{str(path)!r}: unknown entries {', '.join(extra)}\n{NPZ_LAYOUT}")
    input_shape = tuple(int(d) for d in arrays.get("input_shape", [layers[0].in_features]))
    model = Model(layers, input_shape, (layers[-1].out_features,))
    model.check()
    return model


# -- ONNX --------------------------------------------------------------------------------

@dataclass
class _Activation:
    """The running activation tensor: its shape (no batch dimension) and the tensor whose
    quantization applies (``"input"`` or the producing layer's name).

    ``edge``: ``"raw_input"`` for the graph input as declared (its layout not yet known),
    ``"hwc_output"`` for a map a layout Transpose turned to NHWC (only Q/DQ may follow).
    ``host_op``: the final Softmax this value comes from, run on the host."""

    shape: tuple[int, ...]
    owner: str = "input"
    layer: Dense | Conv | Pool | Add | None = None
    after_layer_ops: list[str] = field(default_factory=list)
    edge: str = ""
    host_op: dict | None = None

    @property
    def features(self) -> int:
        return int(np.prod(self.shape))

    def reshaped(self, shape: tuple[int, ...]) -> _Activation:
        return _Activation(shape, self.owner, self.layer, self.after_layer_ops)

    def transposed_output(self) -> _Activation:
        """The same map, given to the user as H×W×C (the NPU keeps C×H×W)."""
        return _Activation(self.shape, self.owner, self.layer, self.after_layer_ops,
                           edge="hwc_output")


@dataclass
class _QuantizedConstant:
    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def dequantize(self) -> np.ndarray:
        shape = [1] * self.values.ndim
        if self.scale.size > 1:
            shape[self.axis] = -1
        scale = self.scale.reshape(shape)
        zero = self.zero_point.reshape(shape) if self.zero_point.size > 1 else self.zero_point
        return ((self.values.astype(np.float64) - zero) * scale).astype(np.float32)


def _describe(node) -> str:
    return f"node {node.name or node.output[0]!r} ({node.op_type})"


def _reshape_target(node, target: list[int], shape: tuple[int, ...]) -> tuple[int, ...]:
    """A Reshape's target shape without the batch: 0 copies the input's dimension (the
    input is (batch, *shape)), one -1 is inferred."""
    source = (-1, *shape)
    dims = [source[i] if d == 0 and i < len(source) else d for i, d in enumerate(target)]
    rest = dims[1:]
    if rest.count(-1) > 1 or (dims[0] == -1 and -1 in rest) or any(d < -1 for d in rest):
        raise ModelError(f"{_describe(node)}: cannot reshape {shape} to {target} (the batch "
                         f"first, at most one -1)")
    known = int(np.prod([d for d in rest if d != -1]))
    if -1 in rest:
        rest[rest.index(-1)] = int(np.prod(shape)) // max(known, 1)
    return tuple(rest)


def _tf2onnx_layer_name(node_name: str) -> str:
    """A short layer name from a tf2onnx node name, which joins the names of the fused
    TensorFlow ops with ';' and ends in '_prequant': as the TFLite front end names it."""
    from .tflite_import import _layer_name

    return _layer_name(node_name.removesuffix("_prequant")) or node_name


def _unsupported(graph) -> list[str]:
    """The nodes npugen cannot take, described: unknown operators, and a Softmax that does
    not follow a layer (npugen runs a Softmax on the host, after the NPU's last layer)."""
    producers = {out: node for node in graph.node for out in node.output}

    def after_layer(node) -> bool:
        source = producers.get(node.input[0])
        while source is not None and source.op_type in PASS_THROUGH_OPS:
            source = producers.get(source.input[0])
        return source is not None and source.op_type in LAYER_OPS

    return [_describe(n) for n in graph.node
            if n.op_type not in SUPPORTED_ONNX_OPS or n.domain not in ("", "ai.onnx")
            or (n.op_type == "Softmax" and not after_layer(n))]


def load_onnx(source: Any) -> Model:
    """Import an ONNX model (a path or an ``onnx.ModelProto``): a chain of Gemm/MatMul
    layers with bias, ReLU/Clip activations, Flatten/Reshape/Identity, optionally with
    QuantizeLinear/DequantizeLinear (QDQ) giving the quantization to use."""
    import onnx
    from onnx import numpy_helper

    if isinstance(source, onnx.ModelProto):
        proto = source
        label = "the ONNX model"
    else:
        label = repr(str(source))
        try:
            proto = onnx.load(str(source))
        except Exception as error:  # protobuf decode errors, truncated files
            raise ModelError(f"{label} is not a valid ONNX model (corrupt or truncated?): "
                             f"{error}") from None
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset and opset < MIN_OPSET:
        raise ModelError(f"{label} uses ONNX opset {opset}; npugen reads opset {MIN_OPSET} "
                         f"and newer (re-export it, e.g. torch.onnx.export(..., "
                         f"opset_version=17))")
    graph = proto.graph
    unsupported = _unsupported(graph)
    if unsupported:
        raise ModelError(
            f"{label} has {len(unsupported)} unsupported node(s): {', '.join(unsupported)}. "
            f"Supported operators: {', '.join(SUPPORTED_ONNX_OPS)} (Softmax as the last "
            f"operator after a layer, Transpose as a layout change of the input or output)")

    values: dict[str, Any] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in values]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelError(f"{label} must have one input and one output, not "
                         f"{len(inputs)} and {len(graph.output)}")
    dims = inputs[0].type.tensor_type.shape.dim
    input_shape = tuple(d.dim_value for d in dims[1:])
    if not dims or any(d <= 0 for d in input_shape):
        raise ModelError(f"input {inputs[0].name!r} needs a leading batch dimension and fixed "
                         f"other dimensions, not {[d.dim_param or d.dim_value for d in dims]}")
    input_name = inputs[0].name
    input_type = inputs[0].type.tensor_type.elem_type
    if input_type not in FLOAT_INPUT_TYPES + (onnx.TensorProto.INT8,):
        raise ModelError(f"{label}: input {input_name!r} is "
                         f"{onnx.helper.tensor_dtype_to_np_dtype(input_type)}; npugen takes a "
                         f"float input, or an int8 input read by a DequantizeLinear (whose "
                         f"scale and zero point it keeps)")
    layers: list[Dense] = []
    tensor_quant: dict[str, QuantParams] = {}
    values[input_name] = _Activation(input_shape, edge="raw_input")
    edges = {"input_layout": "chw", "input_shape": input_shape}
    input_reads: set[str] = set()
    layer_names: set[str] = {"input"}

    def layer_name(node) -> str:
        """The node's name (a tf2onnx name shortened), unique among the layers."""
        base = node.name or node.output[0]
        if proto.producer_name == "tf2onnx":
            base = _tf2onnx_layer_name(base)
        name, index = base, 1
        while name in layer_names:
            index += 1
            name = f"{base}#{index}"
        layer_names.add(name)
        return name

    def reads(act: _Activation) -> None:
        """Note which view of the model's input a layer reads."""
        if act.owner == "input":
            input_reads.add("raw_input" if act.edge == "raw_input" else "layout")

    def constant(node, index: int, what: str) -> np.ndarray:
        if index >= len(node.input) or node.input[index] == "":
            return None
        value = values.get(node.input[index])
        if isinstance(value, np.ndarray):
            return value
        raise ModelError(f"{_describe(node)}: its {what} must be a constant (an initializer)")

    def activation(node) -> _Activation:
        value = values.get(node.input[0])
        if not isinstance(value, _Activation):
            raise ModelError(f"{_describe(node)}: its first input must be the model's "
                             f"activation, not a constant")
        if value.edge == "hwc_output":
            raise ModelError(f"{_describe(node)}: reads a map that a layout Transpose turned "
                             f"to NHWC; npugen takes such a Transpose as the model's last "
                             f"operator only")
        return value

    def weight_of(node, index: int, transpose: bool) -> tuple[np.ndarray, _QuantizedConstant]:
        value = values.get(node.input[index])
        if isinstance(value, _QuantizedConstant):
            quantized = value
            real = value.dequantize()
        elif isinstance(value, np.ndarray):
            quantized, real = None, value.astype(np.float32)
        else:
            raise ModelError(f"{_describe(node)}: its weights must be a constant")
        if real.ndim != 2:
            raise ModelError(f"{_describe(node)}: weights must be 2-D, not {real.shape}")
        return (real.T if transpose else real), quantized

    def add_layer(node, act: _Activation, weight: np.ndarray, quantized, transpose: bool):
        if weight.shape[0] != act.features:
            raise ModelError(f"{_describe(node)}: weights of shape {weight.shape} do not take "
                             f"{act.features} input features")
        reads(act)
        name = layer_name(node)
        layer = Dense(name, weight.astype(np.float32), np.zeros(weight.shape[1], np.float32),
                      inputs=(act.owner,))
        if quantized is not None:
            q = quantized.values.T if transpose else quantized.values
            channel_axis = 0 if transpose else 1
            if quantized.scale.size > 1 and quantized.axis % 2 != channel_axis:
                raise ModelError(f"{_describe(node)}: per-channel weight scales must be along "
                                 f"the output channels")
            layer.quantized_weight = q.astype(np.int64)
            layer.weight_quant = QuantParams(
                np.broadcast_to(quantized.scale.astype(np.float64), (weight.shape[1],)).copy(),
                np.broadcast_to(quantized.zero_point.astype(np.int64),
                                (weight.shape[1],)).copy())
        layers.append(layer)
        return _Activation((weight.shape[1],), owner=name, layer=layer)

    def set_bias(node, act: _Activation, bias) -> None:
        layer = act.layer
        if not isinstance(layer, Dense) or act.after_layer_ops:
            raise ModelError(f"{_describe(node)}: a bias Add must directly follow a Gemm or "
                             f"MatMul (adding two activations is not supported yet)")
        if isinstance(bias, _QuantizedConstant):
            layer.quantized_bias = bias.values.reshape(-1).astype(np.int64)
            bias = bias.dequantize()
        bias = np.asarray(bias, dtype=np.float32).reshape(-1)
        if bias.size == 1:
            bias = np.full(layer.out_features, bias[0], np.float32)
        if bias.shape != (layer.out_features,):
            raise ModelError(f"{_describe(node)}: bias of shape {bias.shape} does not match "
                             f"{layer.out_features} outputs")
        layer.bias = layer.bias + bias

    def clamp(node, act: _Activation, low: float, high: float) -> _Activation:
        fused(node)
        if not isinstance(act.layer, Dense | Conv | Add) or act.owner != act.layer.name:
            raise ModelError(f"{_describe(node)}: an activation must follow a Gemm, MatMul, "
                             f"Conv or Add (put it before a pooling: they commute)")
        act.layer.low = max(act.layer.low, low)
        act.layer.high = min(act.layer.high, high)
        return _Activation(act.shape, act.owner, act.layer, [*act.after_layer_ops, "clamp"])

    def attribute(node, name: str, default):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1

    def fused(node) -> None:
        """Activations and BatchNormalization fold into the layer before them: the tensor
        they read must have no other reader."""
        if consumers.get(node.input[0], 0) > 1:
            raise ModelError(f"{_describe(node)}: its input {node.input[0]!r} is also read by "
                             f"another node, but the NPU folds this node into the layer that "
                             f"makes it")

    def window(node, act: _Activation, kernel: tuple[int, int],
               one_stride: bool = True) -> tuple[Any, tuple]:
        """Stride (one, or (vertical, horizontal) where ``one_stride`` is false) and (top,
        left, bottom, right) pads of a Conv or pooling node."""
        if len(act.shape) != 3:
            raise ModelError(f"{_describe(node)}: needs a C×H×W feature map, not shape "
                             f"{act.shape}")
        strides = [int(s) for s in attribute(node, "strides", [1, 1])]
        if len(strides) != 2 or not all(1 <= s <= 255 for s in strides):
            raise ModelError(f"{_describe(node)}: strides {strides} are not supported (two, "
                             f"1 to 255)")
        if one_stride and strides[0] != strides[1]:
            raise ModelError(f"{_describe(node)}: strides {strides} differ; the NPU takes "
                             f"one stride for both axes")
        if any(d != 1 for d in attribute(node, "dilations", [1, 1])):
            raise ModelError(f"{_describe(node)}: dilations other than 1 are not supported")
        if attribute(node, "ceil_mode", 0):
            raise ModelError(f"{_describe(node)}: ceil_mode=1 is not supported")
        stride = strides[0] if strides[0] == strides[1] else (strides[0], strides[1])
        auto_pad = attribute(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            return stride, same_pads(act.shape[1:], kernel, strides,
                                     odd_after=auto_pad == "SAME_UPPER")
        if auto_pad == "VALID":
            return stride, (0, 0, 0, 0)
        pads = [int(p) for p in attribute(node, "pads", [0, 0, 0, 0])]
        return stride, (pads[0], pads[1], pads[2], pads[3])

    def map_layer(node, act: _Activation, layer) -> _Activation:
        try:
            shape = output_shape(layer, act.shape)
        except ModelError as error:
            raise ModelError(f"{_describe(node)}: {error}") from None
        reads(act)
        layer.inputs = (act.owner,)
        layers.append(layer)
        return _Activation(shape, owner=layer.name, layer=layer)

    def conv(node) -> _Activation:
        act = activation(node)
        value = values.get(node.input[1])
        quantized = value if isinstance(value, _QuantizedConstant) else None
        real = value.dequantize() if quantized else value
        if not isinstance(real, np.ndarray) or real.ndim != 4:
            raise ModelError(f"{_describe(node)}: its weights must be a 4-D constant "
                             f"(O, I, kh, kw)")
        kernel = (real.shape[2], real.shape[3])
        if not all(1 <= k <= 255 for k in kernel):
            raise ModelError(f"{_describe(node)}: kernel {kernel} is not supported")
        stride, pads = window(node, act, kernel)
        groups = int(attribute(node, "group", 1))
        channels = act.shape[0]
        name = layer_name(node)
        if groups == 1:
            order = (2, 3, 1, 0)      # (O, I, kh, kw) → (kh, kw, I, O)
        elif groups == channels and real.shape[:2] == (channels, 1):
            order = (1, 2, 0)         # depthwise: (C, 1, kh, kw)[:, 0] → (kh, kw, C)
        else:
            raise ModelError(f"{_describe(node)}: group={groups} is not supported (1, or "
                             f"the channel count {channels} with one filter per channel)")
        depthwise = groups != 1
        weight = real[:, 0] if depthwise else real
        layer = Conv(name, weight.transpose(order).astype(np.float32),
                     np.zeros(real.shape[0], np.float32), stride, pads, depthwise)
        if quantized is not None:
            if quantized.scale.size > 1 and quantized.axis != 0:
                raise ModelError(f"{_describe(node)}: per-channel weight scales must be along "
                                 f"the output channels (axis 0)")
            q = quantized.values[:, 0] if depthwise else quantized.values
            layer.quantized_weight = q.transpose(order).astype(np.int64)
            out = real.shape[0]
            layer.weight_quant = QuantParams(
                np.broadcast_to(quantized.scale.astype(np.float64), (out,)).copy(),
                np.broadcast_to(quantized.zero_point.astype(np.int64), (out,)).copy())
        new = map_layer(node, act, layer)
        if len(node.input) > 2 and node.input[2]:
            bias = values.get(node.input[2])
            if isinstance(bias, _QuantizedConstant):
                layer.quantized_bias = bias.values.reshape(-1).astype(np.int64)
                bias = bias.dequantize()
            if not isinstance(bias, np.ndarray) or bias.size != layer.out_features:
                raise ModelError(f"{_describe(node)}: its bias must be a constant of "
                                 f"{layer.out_features} values")
            layer.bias = bias.astype(np.float32).reshape(-1)
        return new

    def batch_norm(node) -> _Activation:
        fused(node)
        act = activation(node)
        layer = act.layer
        if not isinstance(layer, Conv) or act.after_layer_ops or layer.quantized_weight \
                is not None:
            raise ModelError(f"{_describe(node)}: BatchNormalization must directly follow a "
                             f"float Conv (it is folded into it)")
        gamma, beta, mean, var = (np.asarray(constant(node, i, what), np.float64) for i, what
                                  in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var")))
        factor = gamma / np.sqrt(var + float(attribute(node, "epsilon", 1e-5)))
        layer.weight = (layer.weight * factor).astype(np.float32)   # output channel last
        layer.bias = ((layer.bias - mean) * factor + beta).astype(np.float32)
        return act

    def pool(node, kind: str) -> _Activation:
        act = activation(node)
        if len(act.shape) != 3:
            raise ModelError(f"{_describe(node)}: needs a C×H×W feature map, not shape "
                             f"{act.shape}")
        if kind == "global":
            return map_layer(node, act, Pool(layer_name(node), "global"))
        kernel = [int(k) for k in attribute(node, "kernel_shape", [])]
        if len(kernel) != 2:
            raise ModelError(f"{_describe(node)}: only 2-D kernels are supported, not "
                             f"{kernel}")
        if len(node.output) > 1 and node.output[1]:
            raise ModelError(f"{_describe(node)}: the Indices output is not supported")
        whole_map = kind == "avg" and tuple(kernel) == act.shape[1:]
        stride, pads = window(node, act, (kernel[0], kernel[1]), one_stride=not whole_map)
        if whole_map and not any(pads):
            # One window over the whole map (as converters write a global pooling).
            return map_layer(node, act, Pool(layer_name(node), "global"))
        if kernel[0] != kernel[1]:
            raise ModelError(f"{_describe(node)}: only square kernels are supported (or one "
                             f"window over the whole {act.shape[1]}×{act.shape[2]} map), not "
                             f"{kernel}")
        if kind == "avg" and any(pads) and not attribute(node, "count_include_pad", 0):
            raise ModelError(f"{_describe(node)}: padded average pooling needs "
                             f"count_include_pad=1 (one divisor for every window)")
        return map_layer(node, act, Pool(layer_name(node), kind, kernel[0], stride, pads))

    def quantize_linear(node) -> Any:
        value = values.get(node.input[0])
        scale = constant(node, 1, "scale")
        zero = constant(node, 2, "zero point")
        zero = np.zeros((), np.int64) if zero is None else zero
        if np.asarray(zero).dtype not in (np.int8, np.int64, np.int32):
            raise ModelError(f"{_describe(node)}: only int8 quantization is supported, "
                             f"not {np.asarray(zero).dtype}")
        if not isinstance(value, _Activation):
            axis = attribute(node, "axis", 1)
            shape = [1] * value.ndim
            if np.asarray(scale).size > 1:
                shape[axis] = -1
            q = np.round(value / np.asarray(scale).reshape(shape)) + np.asarray(
                zero).reshape(shape if np.asarray(zero).size > 1 else ())
            return np.clip(q, -128, 127).astype(np.int64)
        if np.asarray(scale).size != 1:
            raise ModelError(f"{_describe(node)}: activations need per-tensor scales")
        quant = QuantParams(float(np.asarray(scale).reshape(-1)[0]),
                            int(np.asarray(zero).reshape(-1)[0]))
        if value.host_op is not None:      # the quantization of a final Softmax's output
            value.host_op["output_scale"] = quant.scale
            value.host_op["output_zero_point"] = quant.zero_point
        else:
            tensor_quant[value.owner] = quant
        return value

    def dequantize_linear(node) -> Any:
        value = values.get(node.input[0])
        if isinstance(value, _Activation):
            if value.owner == "input" and input_type == onnx.TensorProto.INT8 \
                    and "input" not in tensor_quant:
                # An int8 graph input (as tf2onnx writes, maybe after a layout Transpose):
                # this node's scale and zero point are the input's quantization.
                scale = np.asarray(constant(node, 1, "scale"))
                zero = constant(node, 2, "zero point")
                if scale.size != 1:
                    raise ModelError(f"{_describe(node)}: the int8 input {input_name!r} "
                                     f"needs a per-tensor scale, not {scale.size}")
                tensor_quant["input"] = QuantParams(
                    float(scale.reshape(-1)[0]),
                    0 if zero is None else int(np.asarray(zero).reshape(-1)[0]))
            return value
        scale = np.asarray(constant(node, 1, "scale"), dtype=np.float64)
        zero = constant(node, 2, "zero point")
        zero = np.zeros(1, np.int64) if zero is None else np.asarray(zero, np.int64)
        return _QuantizedConstant(np.asarray(value).astype(np.int64), scale, zero,
                                  attribute(node, "axis", 1))

    def gemm(node) -> _Activation:
        act = activation(node)
        if attribute(node, "transA", 0):
            raise ModelError(f"{_describe(node)}: transA=1 is not supported")
        alpha, beta = attribute(node, "alpha", 1.0), attribute(node, "beta", 1.0)
        transpose = bool(attribute(node, "transB", 0))
        weight, quantized = weight_of(node, 1, transpose)
        if alpha != 1.0:
            if quantized is not None:
                raise ModelError(f"{_describe(node)}: alpha must be 1 with quantized weights")
            weight = weight * alpha
        new = add_layer(node, act, weight, quantized, transpose)
        if len(node.input) > 2 and node.input[2]:
            bias = values.get(node.input[2])
            if not isinstance(bias, (np.ndarray, _QuantizedConstant)):
                raise ModelError(f"{_describe(node)}: its bias must be a constant")
            if beta != 1.0:
                if isinstance(bias, _QuantizedConstant):
                    raise ModelError(f"{_describe(node)}: beta must be 1 with a quantized bias")
                bias = bias * beta
            set_bias(node, new, bias)
        return new

    def add(node) -> _Activation:
        first, second = (values.get(name) for name in node.input[:2])
        if isinstance(first, _Activation) and isinstance(second, _Activation):
            # Two tensors: a residual connection, computed on chip.
            if first.shape != second.shape:
                raise ModelError(f"{_describe(node)}: adds shapes {first.shape} and "
                                 f"{second.shape}; they must be equal (no broadcasting)")
            reads(first)
            reads(second)
            layer = Add(layer_name(node), (first.owner, second.owner))
            layers.append(layer)
            return _Activation(first.shape, owner=layer.name, layer=layer)
        act, bias = (first, second) if isinstance(first, _Activation) else (second, first)
        if not isinstance(act, _Activation) or isinstance(bias, _Activation):
            raise ModelError(f"{_describe(node)}: an Add needs an activation input")
        set_bias(node, act, bias)
        return act

    def clip(node) -> _Activation:
        low = constant(node, 1, "min")
        high = constant(node, 2, "max")
        low = -np.inf if low is None else float(low)
        high = np.inf if high is None else float(high)
        return clamp(node, activation(node), low, high)

    def flatten(node) -> _Activation:
        if attribute(node, "axis", 1) != 1:
            raise ModelError(f"{_describe(node)}: only axis=1 (keep the batch) is supported")
        act = activation(node)
        return act.reshaped((act.features,))

    def reshape(node) -> _Activation:
        """Reshapes that move no value: a map flattened to (batch, features), a shape
        unchanged, or a layout change of a map with one channel at the model's edges
        ((H, W, 1) ↔ (1, H, W), which is NHWC ↔ NCHW without moving a value)."""
        act = activation(node)
        shape = constant(node, 1, "shape")
        target = _reshape_target(node, [int(d) for d in np.asarray(shape).reshape(-1)],
                                 act.shape)
        if target == (act.features,):
            return act.reshaped(target)
        if target == act.shape:
            return act
        if len(act.shape) == 3 and len(target) == 3:
            if act.edge == "raw_input" and act.shape[2] == 1 \
                    and target == (1, *act.shape[:2]):
                return layout_input(node, act)
            if act.edge == "" and act.shape[0] == 1 and target == (*act.shape[1:], 1):
                return act.transposed_output()
        raise ModelError(f"{_describe(node)}: reshapes {act.shape} to {target}; npugen takes "
                         f"a Reshape that flattens a map to (batch, {act.features}), keeps "
                         f"the shape, or changes the layout of a one-channel map at the "
                         f"model's input or output")

    def transpose(node) -> _Activation:
        """A layout Transpose at the model's edges: NHWC → NCHW on the input, NCHW →
        NHWC on the output; the host converts the user's maps."""
        act = activation(node)
        perm = [int(p) for p in attribute(node, "perm", [])]
        if len(act.shape) == 3 and perm == [0, 3, 1, 2] and act.edge == "raw_input":
            return layout_input(node, act)
        if len(act.shape) == 3 and perm == [0, 2, 3, 1] and act.edge == "":
            return act.transposed_output()
        where = ("the model's input" if act.edge == "raw_input" else
                 "an NHWC output" if act.edge == "hwc_output" else
                 f"the output of {act.owner!r}")
        raise ModelError(f"{_describe(node)}: transposes {where} (shape {act.shape}) with "
                         f"perm {perm}; npugen takes a Transpose only as a layout change at "
                         f"the model's edges: NHWC → NCHW (perm [0, 3, 1, 2]) of the input, "
                         f"NCHW → NHWC (perm [0, 2, 3, 1]) of the output")

    def reduce_mean(node) -> _Activation:
        """The mean over a map's height and width (as PyTorch's dynamo exporter writes
        a global average pooling)."""
        act = activation(node)
        axes = attribute(node, "axes", None)
        if axes is None:
            axes = constant(node, 1, "axes")
        axes = sorted(int(a) % 4 for a in np.asarray(axes if axes is not None else []).reshape(-1))
        if len(act.shape) != 3 or axes != [2, 3]:
            raise ModelError(f"{_describe(node)}: npugen takes a ReduceMean over the height "
                             f"and width of a map (axes [2, 3]), not axes {axes} of shape "
                             f"{act.shape}")
        pooled = map_layer(node, act, Pool(layer_name(node), "global"))
        keep = attribute(node, "keepdims", 1)
        return pooled if keep else pooled.reshaped((act.shape[0],))

    def layout_input(node, act: _Activation) -> _Activation:
        height, width, channels = act.shape
        edges["input_layout"] = "hwc"
        edges["input_shape"] = (channels, height, width)
        return _Activation(edges["input_shape"], owner="input")

    def softmax(node) -> _Activation:
        act = activation(node)
        axis = int(attribute(node, "axis", -1))
        if len(act.shape) != 1 or axis not in (-1, 1) or act.layer is None:
            raise ModelError(f"{_describe(node)}: npugen runs a Softmax on the host over the "
                             f"features of the last layer's output (axis -1 of (batch, "
                             f"features)), not axis {axis} of shape {act.shape}")
        host_op = {"op": "float_softmax", "axis": -1}
        host_ops.append(host_op)
        return _Activation(act.shape, act.owner, act.layer, act.after_layer_ops,
                           host_op=host_op)

    handlers = {
        "Constant": lambda node: numpy_helper.to_array(attribute(node, "value", None)),
        "Identity": lambda node: values[node.input[0]],
        "QuantizeLinear": quantize_linear,
        "DequantizeLinear": dequantize_linear,
        "Gemm": gemm,
        "MatMul": lambda node: add_layer(node, activation(node),
                                         *weight_of(node, 1, False), False),
        "Add": add,
        "Conv": conv,
        "BatchNormalization": batch_norm,
        "MaxPool": lambda node: pool(node, "max"),
        "AveragePool": lambda node: pool(node, "avg"),
        "GlobalAveragePool": lambda node: pool(node, "global"),
        "ReduceMean": reduce_mean,
        "Relu": lambda node: clamp(node, activation(node), 0.0, np.inf),
        "Clip": clip,
        "Flatten": flatten,
        "Reshape": reshape,
        "Transpose": transpose,
        "Softmax": softmax,
    }
    host_ops: list[dict] = []
    for node in graph.node:
        if host_ops and node.op_type not in AFTER_SOFTMAX_OPS:
            raise ModelError(f"{_describe(node)} follows the Softmax; npugen runs a Softmax "
                             f"as the model's last operator only")
        values[node.output[0]] = handlers[node.op_type](node)
    if input_type == onnx.TensorProto.INT8 and "input" not in tensor_quant:
        raise ModelError(f"{label}: input {input_name!r} is int8 but no DequantizeLinear "
                         f"reads it, so its scale and zero point are unknown; npugen takes "
                         f"a float input, or an int8 input read by a DequantizeLinear")
    result = values.get(graph.output[0].name)
    if not isinstance(result, _Activation):
        raise ModelError(f"{label}: the output {graph.output[0].name!r} is not computed from "
                         f"the input by supported operators")
    if layers and result.layer is not layers[-1]:
        raise ModelError(f"{label}: the output must come from the last layer")
    if input_reads == {"raw_input", "layout"}:
        raise ModelError(f"{label}: layers read the input {input_name!r} both as it is and "
                         f"through a layout change (Transpose); npugen takes one layout")
    for op in host_ops:
        # A Softmax without a QuantizeLinear after it gives probabilities at TFLite's
        # output quantization (steps of 1/256).
        op.setdefault("output_scale", 1.0 / 256)
        op.setdefault("output_zero_point", -128)
    output_type = graph.output[0].type.tensor_type.elem_type
    # A QDQ model prescribes ONNX's arithmetic (one rounding); a float one npugen
    # quantizes itself.
    model = Model(layers, edges["input_shape"], result.shape, inputs[0].name,
                  graph.output[0].name, tensor_quant,
                  framework="onnx" if tensor_quant else "npugen",
                  input_layout=edges["input_layout"],
                  output_layout="hwc" if result.edge == "hwc_output" else "chw",
                  input_dtype="int8" if input_type == onnx.TensorProto.INT8 else "float32",
                  output_dtype="int8" if output_type == onnx.TensorProto.INT8 else "float32",
                  host_ops=host_ops)
    model.check()
    return model
