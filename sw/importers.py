"""Model importers: ONNX (float or QDQ) and a plain ``.npz`` of layer weights;
:func:`load_model` picks one by the file's suffix, and ``.tflite`` files go to
:func:`npugen.tflite_import.load_tflite`.

All return a :class:`~npugen.graph.Model`. Errors are :class:`~npugen.graph.ModelError`
and name the node (by name and op type) or the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .featuremap import same_pads
from .graph import Add, Conv, Dense, Model, ModelError, Pool, QuantParams, output_shape
from .passes import Activation, BatchNorm, Graph, Layout, run_passes

if TYPE_CHECKING:
    from onnx import ModelProto, NodeProto

__all__ = ["load_model", "load_onnx", "load_npz", "SUPPORTED_ONNX_OPS", "NPZ_LAYOUT"]

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
    """The running activation tensor: its shape (no batch dimension; the graph input's as
    declared, the others C×H×W) and the tensor whose quantization applies (``"input"`` or
    the producing layer's or node's name).

    ``host_op``: the final Softmax this value comes from, run on the host."""

    shape: tuple[int, ...]
    owner: str = "input"
    layer: Dense | Conv | Pool | Add | Activation | BatchNorm | Layout | None = None
    host_op: dict | None = None

    @property
    def features(self) -> int:
        return int(np.prod(self.shape))

    def reshaped(self, shape: tuple[int, ...]) -> _Activation:
        return _Activation(shape, self.owner, self.layer)

    @property
    def is_input(self) -> bool:
        """Whether this is the model's input, maybe through a layout change."""
        return self.owner == "input" or (isinstance(self.layer, Layout)
                                         and self.layer.inputs == ("input",))


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


def _few(values: Any) -> str:
    """Up to three distinct values, for an error."""
    distinct = np.unique(np.asarray(values)).tolist()
    return ", ".join(f"{v:g}" for v in distinct[:3]) + (", …" if len(distinct) > 3 else "")


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


class _OnnxBuilder:
    """The state of one ONNX import, shared by the operator handlers (:data:`ONNX_HANDLERS`):
    the value of every tensor read so far (constants as arrays, the running activation as
    an :class:`_Activation`), the layers made, the activations' quantization, and how
    the model's input is read."""

    def __init__(self, proto: ModelProto, label: str, values: dict[str, Any],
                 input_name: str, input_shape: tuple[int, ...], int8_input: bool) -> None:
        self.proto = proto
        self.label = label
        self.values = values
        self.input_name = input_name
        self.int8_input = int8_input
        self.layers: list[Dense | Conv | Pool | Add | Activation | BatchNorm | Layout] = []
        self.tensor_quant: dict[str, QuantParams] = {}
        values[input_name] = _Activation(input_shape)
        self.input_shape = input_shape
        self.layer_names: set[str] = {"input"}
        self.host_ops: list[dict] = []

    @classmethod
    def for_graph(cls, proto: ModelProto, label: str) -> _OnnxBuilder:
        """The builder for a checked model's graph: its one input (batch first, the other
        dimensions fixed; float, or int8 read by a DequantizeLinear) and one output."""
        import onnx
        from onnx import numpy_helper

        graph = proto.graph
        values: dict[str, Any] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in values]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ModelError(f"{label} must have one input and one output, not "
                             f"{len(inputs)} and {len(graph.output)}")
        dims = inputs[0].type.tensor_type.shape.dim
        input_shape = tuple(d.dim_value for d in dims[1:])
        if not dims or any(d <= 0 for d in input_shape):
            raise ModelError(f"input {inputs[0].name!r} needs a leading batch dimension and "
                             f"fixed other dimensions, not "
                             f"{[d.dim_param or d.dim_value for d in dims]}")
        input_name = inputs[0].name
        input_type = inputs[0].type.tensor_type.elem_type
        if input_type not in FLOAT_INPUT_TYPES + (onnx.TensorProto.INT8,):
            raise ModelError(f"{label}: input {input_name!r} is "
                             f"{onnx.helper.tensor_dtype_to_np_dtype(input_type)}; npugen takes "
                             f"a float input, or an int8 input read by a DequantizeLinear "
                             f"(whose scale and zero point it keeps)")
        return cls(proto, label, values, input_name, input_shape,
                   input_type == onnx.TensorProto.INT8)

    def layer_name(self, node: NodeProto) -> str:
        """The node's name (a tf2onnx name shortened), unique among the layers."""
        base = node.name or node.output[0]
        if self.proto.producer_name == "tf2onnx":
            base = _tf2onnx_layer_name(base)
        name, index = base, 1
        while name in self.layer_names:
            index += 1
            name = f"{base}#{index}"
        self.layer_names.add(name)
        return name

    def constant(self, node: NodeProto, index: int, what: str) -> np.ndarray | None:
        """The node's input ``index`` (an initializer), or None where it is omitted."""
        if index >= len(node.input) or node.input[index] == "":
            return None
        value = self.values.get(node.input[index])
        if isinstance(value, np.ndarray):
            return value
        raise ModelError(f"{_describe(node)}: its {what} must be a constant (an initializer)")

    def activation(self, node: NodeProto) -> _Activation:
        """The node's first input, which must be the running activation."""
        value = self.values.get(node.input[0])
        if not isinstance(value, _Activation):
            raise ModelError(f"{_describe(node)}: its first input must be the model's "
                             f"activation, not a constant")
        return value

    def weight_of(self, node: NodeProto, index: int,
                  transpose: bool) -> tuple[np.ndarray, _QuantizedConstant | None]:
        """A Gemm's or MatMul's 2-D weights as (in, out) reals, and their quantization."""
        value = self.values.get(node.input[index])
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

    def add_layer(self, node: NodeProto, act: _Activation, weight: np.ndarray,
                  quantized: _QuantizedConstant | None, transpose: bool) -> _Activation:
        """Append a Dense layer reading ``act``, without bias."""
        if weight.shape[0] != act.features:
            raise ModelError(f"{_describe(node)}: weights of shape {weight.shape} do not take "
                             f"{act.features} input features")
        name = self.layer_name(node)
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
        self.layers.append(layer)
        return _Activation((weight.shape[1],), owner=name, layer=layer)

    def set_bias(self, node: NodeProto, act: _Activation, bias: Any) -> None:
        """Add ``bias`` to the Dense layer that makes ``act``."""
        layer = act.layer
        if not isinstance(layer, Dense):
            raise ModelError(f"{_describe(node)}: a bias Add must directly follow a Gemm or "
                             f"MatMul (adding two activations is not supported yet)")
        if act.owner in self.tensor_quant:
            quant = self.tensor_quant[act.owner]
            raise ModelError(
                f"{_describe(node)}: adds a bias to the output of {act.owner!r} after it is "
                f"quantized (scale {quant.scale:g}, zero point {quant.zero_point}), so the "
                f"model rounds twice; npugen adds a bias in the layer's accumulator, before "
                f"its one rounding. Fuse the MatMul and the Add into a Gemm before "
                f"quantizing (onnxruntime's quant_pre_process does), or give npugen the "
                f"float model")
        if isinstance(bias, _QuantizedConstant):
            layer.quantized_bias = self.accumulator_bias(node, layer, bias)
            bias = bias.dequantize()
        bias = np.asarray(bias, dtype=np.float32).reshape(-1)
        if bias.size == 1:
            bias = np.full(layer.out_features, bias[0], np.float32)
        if bias.shape != (layer.out_features,):
            raise ModelError(f"{_describe(node)}: bias of shape {bias.shape} does not match "
                             f"{layer.out_features} outputs")
        layer.bias = layer.bias + bias

    def accumulator_bias(self, node: NodeProto, layer: Dense | Conv,
                         bias: _QuantizedConstant) -> np.ndarray | None:
        """A quantized bias as integers of ``layer``'s accumulator (scale input scale ×
        weight scale, zero point 0), which the NPU adds before rounding: the constant's
        own values when it is quantized so (as onnxruntime quantizes Conv and Gemm
        biases), or converted when its scale is a whole number of those steps (its zero
        point subtracted). None where the layer's input or weights are float (npugen
        quantizes the bias with the layer). A bias whose scale is not a whole number of
        the accumulator's steps cannot be added exactly: ``ModelError``."""
        owner = layer.inputs[0]
        layouts = {n.name: n for n in self.layers if isinstance(n, Layout)}
        while owner not in self.tensor_quant and owner in layouts:
            owner = layouts[owner].inputs[0]    # a layout change keeps the quantization
        source = self.tensor_quant.get(owner)
        if source is None or layer.weight_quant is None:
            return None
        channels = layer.out_features
        step = source.scale * np.broadcast_to(
            np.asarray(layer.weight_quant.scale, np.float64), (channels,))
        values = bias.values.reshape(-1).astype(np.int64)
        if values.size == 1:
            values = np.full(channels, values[0])
        if values.size != channels:
            return None     # the shape check that follows names it
        scale = np.broadcast_to(bias.scale.astype(np.float64).reshape(-1), (channels,))
        zero = np.broadcast_to(bias.zero_point.astype(np.int64).reshape(-1), (channels,))
        # float32 scales: a whole ratio shows within float32's relative error.
        ratio = np.round(scale / step)
        if np.all(ratio >= 1) and np.allclose(scale, ratio * step, rtol=1e-6, atol=0):
            return (values - zero) * ratio.astype(np.int64)
        raise ModelError(
            f"{_describe(node)}: its bias is quantized with scale {_few(bias.scale)} and "
            f"zero point {_few(bias.zero_point)}, a scale that is not a whole number of "
            f"the layer's accumulator steps (input scale × weight scale = {_few(step)}), "
            f"where npugen adds it; quantize the bias to int32 with that scale and zero "
            f"point 0, as onnxruntime's quantize_static does")

    def fold_later(self, act: _Activation, node: Activation | BatchNorm) -> _Activation:
        """Append a node that the graph passes (sw/passes.py) fold into the layer that
        makes ``act``."""
        self.layers.append(node)
        return _Activation(act.shape, owner=node.name, layer=node)

    @staticmethod
    def attribute(node: NodeProto, name: str, default: Any) -> Any:
        """The node's attribute ``name``, or ``default`` where it has none."""
        import onnx

        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def window(self, node: NodeProto, act: _Activation,
               kernel: tuple[int, int]) -> tuple[Any, tuple]:
        """Stride (one, or (vertical, horizontal)) and (top, left, bottom, right) pads of a
        Conv or pooling node."""
        if len(act.shape) != 3:
            raise ModelError(f"{_describe(node)}: needs a C×H×W feature map, not shape "
                             f"{act.shape}")
        strides = [int(s) for s in self.attribute(node, "strides", [1, 1])]
        if len(strides) != 2 or not all(1 <= s <= 255 for s in strides):
            raise ModelError(f"{_describe(node)}: strides {strides} are not supported (two, "
                             f"1 to 255)")
        if any(d != 1 for d in self.attribute(node, "dilations", [1, 1])):
            raise ModelError(f"{_describe(node)}: dilations other than 1 are not supported")
        if self.attribute(node, "ceil_mode", 0):
            raise ModelError(f"{_describe(node)}: ceil_mode=1 is not supported")
        stride = strides[0] if strides[0] == strides[1] else (strides[0], strides[1])
        auto_pad = self.attribute(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            return stride, same_pads(act.shape[1:], kernel, strides,
                                     odd_after=auto_pad == "SAME_UPPER")
        if auto_pad == "VALID":
            return stride, (0, 0, 0, 0)
        pads = [int(p) for p in self.attribute(node, "pads", [0, 0, 0, 0])]
        return stride, (pads[0], pads[1], pads[2], pads[3])

    def map_layer(self, node: NodeProto, act: _Activation,
                  layer: Conv | Pool) -> _Activation:
        """Append a layer over the feature map ``act``."""
        try:
            shape = output_shape(layer, act.shape)
        except ModelError as error:
            raise ModelError(f"{_describe(node)}: {error}") from None
        layer.inputs = (act.owner,)
        self.layers.append(layer)
        return _Activation(shape, owner=layer.name, layer=layer)

    def layout(self, node: NodeProto, act: _Activation, source: str,
               target: str) -> _Activation:
        """Append a layout change of ``act`` from ``source`` to ``target`` order, which the
        graph passes fold at the model's edges. On the model's input it tells the map's
        C×H×W shape; elsewhere the NPU's map stays as it is."""
        shape = act.shape
        if act.owner == "input" and source == "hwc":
            shape = (shape[2], shape[0], shape[1])
        # Named apart from the layers (it is folded away): no layer's name takes a "#2".
        layer = Layout(f"layout {node.name or node.output[0]}", (act.owner,), _describe(node),
                       source, target, shape)
        self.layers.append(layer)
        return _Activation(shape, owner=layer.name, layer=layer)

    def model(self) -> Model:
        """The model, once every node is read: its output must be the last layer's."""
        from onnx import TensorProto

        graph = self.proto.graph
        label, input_name = self.label, self.input_name
        if self.int8_input and "input" not in self.tensor_quant:
            raise ModelError(f"{label}: input {input_name!r} is int8 but no DequantizeLinear "
                             f"reads it, so its scale and zero point are unknown; npugen takes "
                             f"a float input, or an int8 input read by a DequantizeLinear")
        result = self.values.get(graph.output[0].name)
        if not isinstance(result, _Activation):
            raise ModelError(f"{label}: the output {graph.output[0].name!r} is not computed "
                             f"from the input by supported operators")
        if self.layers and result.layer is not self.layers[-1]:
            raise ModelError(f"{label}: the output must come from the last layer")
        for op in self.host_ops:
            # A Softmax without a QuantizeLinear after it gives probabilities at TFLite's
            # output quantization (steps of 1/256).
            op.setdefault("output_scale", 1.0 / 256)
            op.setdefault("output_zero_point", -128)
        output_type = graph.output[0].type.tensor_type.elem_type
        framework = "onnx" if self.tensor_quant else "npugen"
        folded = run_passes(Graph(self.layers, self.input_shape, self.tensor_quant))
        # A QDQ model prescribes ONNX's arithmetic (one rounding); a float one npugen
        # quantizes itself.
        model = Model(folded.layers, folded.input_shape, result.shape, input_name,
                      graph.output[0].name, folded.tensor_quant, framework=framework,
                      input_layout=folded.input_layout, output_layout=folded.output_layout,
                      input_dtype="int8" if self.int8_input else "float32",
                      output_dtype="int8" if output_type == TensorProto.INT8 else "float32",
                      host_ops=self.host_ops)
        model.check()
        return model


# One handler per operator: each takes the builder and the node, and returns the value of
# the node's (first) output.

def _constant(b: _OnnxBuilder, node: NodeProto) -> np.ndarray:
    """Constant: its value, as an array."""
    from onnx import numpy_helper

    return numpy_helper.to_array(b.attribute(node, "value", None))


def _identity(b: _OnnxBuilder, node: NodeProto) -> Any:
    """Identity: its input."""
    return b.values[node.input[0]]


def _conv(b: _OnnxBuilder, node: NodeProto) -> _Activation:
    """Conv: a convolution, or a depthwise one (a group per channel)."""
    act = b.activation(node)
    value = b.values.get(node.input[1])
    quantized = value if isinstance(value, _QuantizedConstant) else None
    real = value.dequantize() if quantized else value
    if not isinstance(real, np.ndarray) or real.ndim != 4:
        raise ModelError(f"{_describe(node)}: its weights must be a 4-D constant "
                         f"(O, I, kh, kw)")
    kernel = (real.shape[2], real.shape[3])
    if not all(1 <= k <= 255 for k in kernel):
        raise ModelError(f"{_describe(node)}: kernel {kernel} is not supported")
    stride, pads = b.window(node, act, kernel)
    groups = int(b.attribute(node, "group", 1))
    channels = act.shape[0]
    name = b.layer_name(node)
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
    new = b.map_layer(node, act, layer)
    if len(node.input) > 2 and node.input[2]:
        bias = b.values.get(node.input[2])
        if isinstance(bias, _QuantizedConstant):
            layer.quantized_bias = b.accumulator_bias(node, layer, bias)
            bias = bias.dequantize()
        if not isinstance(bias, np.ndarray) or bias.size != layer.out_features:
            raise ModelError(f"{_describe(node)}: its bias must be a constant of "
                             f"{layer.out_features} values")
        layer.bias = bias.astype(np.float32).reshape(-1)
    return new


def _batch_norm(b: _OnnxBuilder, node: NodeProto) -> _Activation:
    """BatchNormalization: folded into the float Conv, Gemm or MatMul before it."""
    scale, bias, mean, variance = (np.asarray(b.constant(node, i, what), np.float64)
                                   for i, what in ((1, "scale"), (2, "bias"), (3, "mean"),
                                                   (4, "var")))
    act = b.activation(node)
    return b.fold_later(act, BatchNorm(b.layer_name(node), (act.owner,), _describe(node),
                                       scale, bias, mean, variance,
                                       float(b.attribute(node, "epsilon", 1e-5))))


def _pool(kind: str) -> Callable[[_OnnxBuilder, NodeProto], _Activation]:
    """MaxPool (``"max"``), AveragePool (``"avg"``) or GlobalAveragePool (``"global"``)."""
    def handler(b: _OnnxBuilder, node: NodeProto) -> _Activation:
        act = b.activation(node)
        if len(act.shape) != 3:
            raise ModelError(f"{_describe(node)}: needs a C×H×W feature map, not shape "
                             f"{act.shape}")
        if kind == "global":
            return b.map_layer(node, act, Pool(b.layer_name(node), "global"))
        kernel = [int(k) for k in b.attribute(node, "kernel_shape", [])]
        if len(kernel) != 2:
            raise ModelError(f"{_describe(node)}: only 2-D kernels are supported, not "
                             f"{kernel}")
        if len(node.output) > 1 and node.output[1]:
            raise ModelError(f"{_describe(node)}: the Indices output is not supported")
        stride, pads = b.window(node, act, (kernel[0], kernel[1]))
        if kind == "avg" and any(pads) and not b.attribute(node, "count_include_pad", 0):
            raise ModelError(f"{_describe(node)}: padded average pooling needs "
                             f"count_include_pad=1 (one divisor for every window)")
        return b.map_layer(node, act, Pool(b.layer_name(node), kind, (kernel[0], kernel[1]),
                                           stride, pads))
    return handler


def _quantize_linear(b: _OnnxBuilder, node: NodeProto) -> Any:
    """QuantizeLinear: a constant quantized, or the quantization of an activation (or of a
    final Softmax's output)."""
    value = b.values.get(node.input[0])
    scale = b.constant(node, 1, "scale")
    zero = b.constant(node, 2, "zero point")
    zero = np.zeros((), np.int64) if zero is None else zero
    if np.asarray(zero).dtype not in (np.int8, np.int64, np.int32):
        raise ModelError(f"{_describe(node)}: only int8 quantization is supported, "
                         f"not {np.asarray(zero).dtype}")
    if not isinstance(value, _Activation):
        axis = b.attribute(node, "axis", 1)
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
        earlier = b.tensor_quant.get(value.owner)
        if earlier is not None and earlier != quant:
            raise ModelError(
                f"{_describe(node)}: quantizes the output of {value.owner!r} again, with "
                f"scale {quant.scale:g} and zero point {quant.zero_point}, after it was "
                f"quantized with scale {earlier.scale:g} and zero point "
                f"{earlier.zero_point}; the model rounds twice, npugen once per layer: "
                f"quantize both alike")
        b.tensor_quant[value.owner] = quant
    return value


def _dequantize_linear(b: _OnnxBuilder, node: NodeProto) -> Any:
    """DequantizeLinear: a quantized constant, or an activation unchanged (the first one
    after an int8 graph input gives the input's quantization)."""
    value = b.values.get(node.input[0])
    if isinstance(value, _Activation):
        if value.is_input and b.int8_input and "input" not in b.tensor_quant:
            # An int8 graph input (as tf2onnx writes, maybe after a layout Transpose):
            # this node's scale and zero point are the input's quantization.
            scale = np.asarray(b.constant(node, 1, "scale"))
            zero = b.constant(node, 2, "zero point")
            if scale.size != 1:
                raise ModelError(f"{_describe(node)}: the int8 input {b.input_name!r} "
                                 f"needs a per-tensor scale, not {scale.size}")
            b.tensor_quant["input"] = QuantParams(
                float(scale.reshape(-1)[0]),
                0 if zero is None else int(np.asarray(zero).reshape(-1)[0]))
        return value
    scale = np.asarray(b.constant(node, 1, "scale"), dtype=np.float64)
    zero = b.constant(node, 2, "zero point")
    zero = np.zeros(1, np.int64) if zero is None else np.asarray(zero, np.int64)
    return _QuantizedConstant(np.asarray(value).astype(np.int64), scale, zero,
                              b.attribute(node, "axis", 1))


def _gemm(b: _OnnxBuilder, node: NodeProto) -> _Activation:
    """Gemm: a dense layer (alpha and beta folded into float weights and bias)."""
    act = b.activation(node)
    if b.attribute(node, "transA", 0):
        raise ModelError(f"{_describe(node)}: transA=1 is not supported")
    alpha, beta = b.attribute(node, "alpha", 1.0), b.attribute(node, "beta", 1.0)
    transpose = bool(b.attribute(node, "transB", 0))
    weight, quantized = b.weight_of(node, 1, transpose)
    if alpha != 1.0:
        if quantized is not None:
            raise ModelError(f"{_describe(node)}: alpha must be 1 with quantized weights")
        weight = weight * alpha
    new = b.add_layer(node, act, weight, quantized, transpose)
    if len(node.input) > 2 and node.input[2]:
        bias = b.values.get(node.input[2])
        if not isinstance(bias, (np.ndarray, _QuantizedConstant)):
            raise ModelError(f"{_describe(node)}: its bias must be a constant")
        if beta != 1.0:
            if isinstance(bias, _QuantizedConstant):
                raise ModelError(f"{_describe(node)}: beta must be 1 with a quantized bias")
            bias = bias * beta
        b.set_bias(node, new, bias)
    return new


def _matmul(b: _OnnxBuilder, node: NodeProto) -> _Activation:
    """MatMul: a dense layer without bias (an Add after it gives one)."""
    return b.add_layer(node, b.activation(node), *b.weight_of(node, 1, False), False)


def _add(b: _OnnxBuilder, node: NodeProto) -> _Activation:
    """Add: of two activations, a residual connection computed on chip; of an activation
    and a constant, the bias of the layer before."""
    first, second = (b.values.get(name) for name in node.input[:2])
    if isinstance(first, _Activation) and isinstance(second, _Activation):
        # Two tensors: a residual connection, computed on chip.
        if first.shape != second.shape:
            raise ModelError(f"{_describe(node)}: adds shapes {first.shape} and "
                             f"{second.shape}; they must be equal (no broadcasting)")
        layer = Add(b.layer_name(node), (first.owner, second.owner))
        b.layers.append(layer)
        return _Activation(first.shape, owner=layer.name, layer=layer)
    act, bias = (first, second) if isinstance(first, _Activation) else (second, first)
    if not isinstance(act, _Activation) or isinstance(bias, _Activation):
        raise ModelError(f"{_describe(node)}: an Add needs an activation input")
    b.set_bias(node, act, bias)
    return act


def _relu(b: _OnnxBuilder, node: NodeProto) -> _Activation:
    """Relu: folded into the layer before."""
    return _activation(b, node, 0.0, np.inf)


def _clip(b: _OnnxBuilder, node: NodeProto) -> _Activation:
    """Clip (e.g. ReLU6): folded into the layer before."""
    low = b.constant(node, 1, "min")
    high = b.constant(node, 2, "max")
    low = -np.inf if low is None else float(low)
    high = np.inf if high is None else float(high)
    return _activation(b, node, low, high)


def _activation(b: _OnnxBuilder, node: NodeProto, low: float, high: float) -> _Activation:
    act = b.activation(node)
    return b.fold_later(act, Activation(b.layer_name(node), (act.owner,), _describe(node),
                                        low, high))


def _flatten(b: _OnnxBuilder, node: NodeProto) -> _Activation:
    """Flatten (axis 1): the activation as a vector."""
    if b.attribute(node, "axis", 1) != 1:
        raise ModelError(f"{_describe(node)}: only axis=1 (keep the batch) is supported")
    act = b.activation(node)
    return act.reshaped((act.features,))


def _reshape(b: _OnnxBuilder, node: NodeProto) -> _Activation:
    """Reshapes that move no value: a map flattened to (batch, features), a shape
    unchanged, or a layout change of a map with one channel at the model's edges
    ((H, W, 1) ↔ (1, H, W), which is NHWC ↔ NCHW without moving a value)."""
    act = b.activation(node)
    shape = b.constant(node, 1, "shape")
    target = _reshape_target(node, [int(d) for d in np.asarray(shape).reshape(-1)],
                             act.shape)
    if target == (act.features,):
        return act.reshaped(target)
    if target == act.shape:
        return act
    if len(act.shape) == 3 and len(target) == 3:
        if act.owner == "input" and act.shape[2] == 1 and target == (1, *act.shape[:2]):
            return b.layout(node, act, "hwc", "chw")
        if act.owner != "input" and act.shape[0] == 1 and target == (*act.shape[1:], 1):
            return b.layout(node, act, "chw", "hwc")
    raise ModelError(f"{_describe(node)}: reshapes {act.shape} to {target}; npugen takes "
                     f"a Reshape that flattens a map to (batch, {act.features}), keeps "
                     f"the shape, or changes the layout of a one-channel map at the "
                     f"model's input or output")


def _transpose(b: _OnnxBuilder, node: NodeProto) -> _Activation:
    """A layout change between NHWC and NCHW (the graph passes take it on the model's
    input or as its last operator): NHWC → NCHW of the input, NCHW → NHWC of a map."""
    act = b.activation(node)
    perm = [int(p) for p in b.attribute(node, "perm", [])]
    at_input = act.owner == "input"
    if len(act.shape) == 3 and perm == [0, 3, 1, 2] and at_input:
        return b.layout(node, act, "hwc", "chw")
    if len(act.shape) == 3 and perm == [0, 2, 3, 1] and not at_input:
        return b.layout(node, act, "chw", "hwc")
    where = "the model's input" if at_input else f"the output of {act.owner!r}"
    raise ModelError(f"{_describe(node)}: transposes {where} (shape {act.shape}) with "
                     f"perm {perm}; npugen takes a Transpose only as a layout change at "
                     f"the model's edges: NHWC → NCHW (perm [0, 3, 1, 2]) of the input, "
                     f"NCHW → NHWC (perm [0, 2, 3, 1]) of the output")


def _reduce_mean(b: _OnnxBuilder, node: NodeProto) -> _Activation:
    """The mean over a map's height and width (as PyTorch's dynamo exporter writes
    a global average pooling)."""
    act = b.activation(node)
    axes = b.attribute(node, "axes", None)
    if axes is None:
        axes = b.constant(node, 1, "axes")
    axes = sorted(int(a) % 4 for a in np.asarray(axes if axes is not None else []).reshape(-1))
    if len(act.shape) != 3 or axes != [2, 3]:
        raise ModelError(f"{_describe(node)}: npugen takes a ReduceMean over the height "
                         f"and width of a map (axes [2, 3]), not axes {axes} of shape "
                         f"{act.shape}")
    pooled = b.map_layer(node, act, Pool(b.layer_name(node), "global"))
    keep = b.attribute(node, "keepdims", 1)
    return pooled if keep else pooled.reshaped((act.shape[0],))


def _softmax(b: _OnnxBuilder, node: NodeProto) -> _Activation:
    """Softmax over the last layer's features, run on the host."""
    act = b.activation(node)
    axis = int(b.attribute(node, "axis", -1))
    if len(act.shape) != 1 or axis not in (-1, 1) or act.layer is None:
        raise ModelError(f"{_describe(node)}: npugen runs a Softmax on the host over the "
                         f"features of the last layer's output (axis -1 of (batch, "
                         f"features)), not axis {axis} of shape {act.shape}")
    host_op = {"op": "float_softmax", "axis": -1}
    b.host_ops.append(host_op)
    return _Activation(act.shape, act.owner, act.layer,
                       host_op=host_op)


ONNX_HANDLERS: dict[str, Callable[[_OnnxBuilder, NodeProto], Any]] = {
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": _pool("global"),
    "ReduceMean": _reduce_mean,
    "Add": _add,
    "Relu": _relu,
    "Clip": _clip,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Identity": _identity,
    "Constant": _constant,
    "QuantizeLinear": _quantize_linear,
    "DequantizeLinear": _dequantize_linear,
    "Transpose": _transpose,
    "Softmax": _softmax,
}
#: The operators the ONNX front end takes (in the order its refusals list them).
SUPPORTED_ONNX_OPS = tuple(ONNX_HANDLERS)


def _read_onnx(source: Any) -> tuple[ModelProto, str]:
    """The model (from a path or an ``onnx.ModelProto``) and how errors name it; refused
    if unreadable, older than :data:`MIN_OPSET` or with unsupported nodes."""
    import onnx

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
    unsupported = _unsupported(proto.graph)
    if unsupported:
        raise ModelError(
            f"{label} has {len(unsupported)} unsupported node(s): {', '.join(unsupported)}. "
            f"Supported operators: {', '.join(SUPPORTED_ONNX_OPS)} (Softmax as the last "
            f"operator after a layer, Transpose as a layout change of the input or output)")
    return proto, label


def load_onnx(source: Any) -> Model:
    """Import an ONNX model (a path or an ``onnx.ModelProto``), float or QDQ (its
    QuantizeLinear/DequantizeLinear give the quantization to use): the operators of
    :data:`ONNX_HANDLERS`, one handler each, sharing an :class:`_OnnxBuilder`, then the
    graph passes of :mod:`npugen.passes` (docs/MODELS.md says what each takes)."""
    proto, label = _read_onnx(source)
    b = _OnnxBuilder.for_graph(proto, label)
    for node in proto.graph.node:
        if b.host_ops and node.op_type not in AFTER_SOFTMAX_OPS:
            raise ModelError(f"{_describe(node)} follows the Softmax; npugen runs a Softmax "
                             f"as the model's last operator only")
        missing = [name for name in node.input if name and name not in b.values]
        if missing:
            raise ModelError(f"{_describe(node)}: input {missing[0]!r} is not an initializer, "
                             f"the graph input or the output of a node before it; the graph "
                             f"is incomplete or not in topological order")
        b.values[node.output[0]] = ONNX_HANDLERS[node.op_type](b, node)
    return b.model()
