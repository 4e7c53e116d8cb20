"""Graph passes both front ends run: the ONNX importer (sw/importers.py) and the TFLite
one (sw/tflite_import.py) turn each operator into one node, and these passes fold the
nodes that the NPU computes as part of a layer, so that each folding rule, and the error
when a node cannot be folded, is written once.

:func:`run_passes` runs, in this order:

0. :func:`fold_layouts`: a :class:`Layout` (ONNX Transpose or one-channel Reshape between
   NCHW and NHWC, TFLite TRANSPOSE) at the model's input or output, as the order in
   which the user gives the input or gets the output; the NPU's maps stay C×H×W.
1. :func:`fold_batch_norms`: a :class:`BatchNorm` (ONNX BatchNormalization) into the
   float Conv or Dense that makes its input: weights scaled, bias shifted.
2. :func:`fuse_activations`: an :class:`Activation` (ONNX Relu and Clip, TFLite RELU,
   RELU6 and RELU_N1_TO_1 written as operators of their own) into the Dense, Conv or Add
   that makes its input, as that layer's clamp.
3. :func:`global_pools`: an average pooling whose one window covers the whole unpadded
   map (as converters write a global average pooling) becomes a global pooling.

A folded node's readers read the layer instead, and the quantization of the node's
output becomes the layer's; where its input had a quantization of its own, the two must
be equal (:meth:`Graph.remove`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .graph import Add, Conv, Dense, Layer, ModelError, Pool, QuantParams, output_shape

__all__ = ["Activation", "BatchNorm", "Layout", "Graph", "run_passes", "fold_layouts",
           "fold_batch_norms", "fuse_activations", "global_pools"]


@dataclass
class Activation:
    """An activation function written as an operator of its own: bounds on the real value
    (``low``, ``high``) and, in a TFLite model, the int8 bounds its framework computed
    from the output quantization (``clamp``). ``where`` names the operator in errors."""

    name: str
    inputs: tuple[str, ...]
    where: str
    low: float = -np.inf
    high: float = np.inf
    clamp: tuple[int, int] | None = None


@dataclass
class BatchNorm:
    """``y = scale · (x − mean) / sqrt(variance + epsilon) + bias`` per channel."""

    name: str
    inputs: tuple[str, ...]
    where: str
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    epsilon: float


@dataclass
class Layout:
    """A change of a map's order between C×H×W (``"chw"``) and H×W×C (``"hwc"``): from
    ``source`` to ``target``. ``shape`` is the C×H×W map it makes; a layout change reading
    the model's input is where that shape is first known (the input is declared in the
    other order)."""

    name: str
    inputs: tuple[str, ...]
    where: str
    source: str
    target: str
    shape: tuple[int, ...]

    def misplaced(self) -> ModelError:
        """The refusal of this layout change inside the model."""
        return ModelError(f"{self.where}: changes the order of {self.inputs[0]!r} from "
                          f"{self.source.upper()} to {self.target.upper()} inside the model; "
                          f"npugen takes a layout change only on the model's input or as its "
                          f"last operator (the NPU's maps are C×H×W)")


Node = Activation | BatchNorm | Layout


@dataclass
class Graph:
    """An importer's layers and nodes in execution order, each naming the tensors it
    reads (``"input"``: the model's input), and the quantization its framework gives
    each tensor (by the name of the layer or node that makes it), and the order in which
    the user gives the input and gets the output (``"chw"`` or ``"hwc"``: the
    framework's own until :func:`fold_layouts`)."""

    layers: list[Layer | Node]
    input_shape: tuple[int, ...]
    tensor_quant: dict[str, QuantParams] = field(default_factory=dict)
    input_layout: str = "chw"
    output_layout: str = "chw"

    def fold(self, node: Node, fits: type | tuple[type, ...], rule: str) -> Layer:
        """Remove ``node``; the layer that makes its input, which must be one of
        ``fits`` (``rule`` says which, in the error) and have no other reader, takes
        its place."""
        (source,) = node.inputs
        producer = next((layer for layer in self.layers if layer.name == source), None)
        if not isinstance(producer, fits):
            made_by = "the model's input" if producer is None else f"{source!r}"
            raise ModelError(f"{node.where}: {rule}; its input is {made_by}")
        others = [layer.name for layer in self.layers
                  if layer is not node and source in layer.inputs]
        if others:
            raise ModelError(f"{node.where}: its input {source!r} is also read by "
                             f"{others[0]!r}, but the NPU folds this operator into the layer "
                             f"that makes it")
        self.remove(node)
        return producer

    def remove(self, node: Node) -> None:
        """Take ``node`` out; its readers read its input, whose quantization becomes the
        node's output's. A node between two different quantizations (its framework
        rounds to the first, then requantizes to the second) cannot be taken out without
        changing the result: ``ModelError`` naming it and both."""
        (source,) = node.inputs
        before, after = self.tensor_quant.get(source), self.tensor_quant.get(node.name)
        if before is not None and after is not None and not _same_quant(before, after):
            raise ModelError(f"{node.where}: its output is quantized with {_describe(after)}, "
                             f"its input {source!r} with {_describe(before)}; npugen folds "
                             f"this operator into the layer that makes its input, which has "
                             f"one output quantization: quantize both sides of it alike")
        self.layers.remove(node)
        for layer in self.layers:
            layer.inputs = tuple(source if name == node.name else name
                                 for name in layer.inputs)
        if node.name in self.tensor_quant:
            self.tensor_quant[source] = self.tensor_quant.pop(node.name)


def _same_quant(a: QuantParams, b: QuantParams) -> bool:
    return (np.array_equal(np.asarray(a.scale), np.asarray(b.scale))
            and np.array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point)))


def _describe(quant: QuantParams) -> str:
    return f"scale {np.asarray(quant.scale).tolist():g} and zero point " \
           f"{np.asarray(quant.zero_point).tolist()}"


def fold_layouts(graph: Graph) -> None:
    input_folded = False
    for node in [n for n in graph.layers if isinstance(n, Layout)]:
        (source,) = node.inputs
        readers = [layer.name for layer in graph.layers if node.name in layer.inputs]
        if source == "input" and not input_folded:
            input_folded = True
            others = [layer.name for layer in graph.layers
                      if layer is not node and "input" in layer.inputs]
            if others:
                raise ModelError(f"{node.where}: the model's input is read both through this "
                                 f"layout change and as it is (by {others[0]!r}); npugen "
                                 f"takes one order")
            graph.input_layout, graph.input_shape = node.source, tuple(node.shape)
        elif not readers and node is graph.layers[-1]:
            graph.output_layout = node.target
        else:
            raise node.misplaced()
        graph.remove(node)


def fold_batch_norms(graph: Graph) -> None:
    for node in [n for n in graph.layers if isinstance(n, BatchNorm)]:
        layer = graph.fold(node, (Conv, Dense), "a BatchNormalization must directly follow "
                                                "a float Conv, Gemm or MatMul (it is folded "
                                                "into it)")
        if layer.quantized_weight is not None:
            raise ModelError(f"{node.where}: a BatchNormalization must directly follow a "
                             f"float layer; {layer.name!r} has quantized weights")
        factor = np.asarray(node.scale, np.float64) / np.sqrt(
            np.asarray(node.variance, np.float64) + node.epsilon)
        if factor.size not in (1, layer.out_features):
            raise ModelError(f"{node.where}: {factor.size} channels, but {layer.name!r} "
                             f"makes {layer.out_features}")
        # The output channel is the weights' last axis (Dense K×N, Conv kh×kw×C_in×C_out,
        # depthwise kh×kw×C).
        layer.weight = (layer.weight * factor).astype(np.float32)
        layer.bias = ((layer.bias - node.mean) * factor + node.bias).astype(np.float32)


def fuse_activations(graph: Graph) -> None:
    for node in [n for n in graph.layers if isinstance(n, Activation)]:
        layer = graph.fold(node, (Dense, Conv, Add), "an activation must follow a "
                                                     "convolution, a dense layer or an add "
                                                     "(put it before a pooling: they "
                                                     "commute)")
        layer.low, layer.high = max(layer.low, node.low), min(layer.high, node.high)
        if node.clamp is not None:
            low, high = layer.clamp or (-128, 127)
            layer.clamp = (max(low, node.clamp[0]), min(high, node.clamp[1]))


def global_pools(graph: Graph) -> None:
    shapes = {"input": tuple(graph.input_shape)}
    for layer in graph.layers:
        shape = shapes[layer.inputs[0]]
        if isinstance(layer, Pool) and layer.kind == "avg" and not any(layer.pads) \
                and len(shape) == 3 and layer.window == tuple(shape[1:]):
            layer.kind, layer.kernel, layer.stride = "global", 1, 1
        shapes[layer.name] = output_shape(layer, shape)


def run_passes(graph: Graph) -> Graph:
    """Fold every node (see the module's docstring); the graph holds layers only after."""
    for index, layer in enumerate(graph.layers):
        if not layer.inputs:
            layer.inputs = ("input",) if index == 0 else (graph.layers[index - 1].name,)
    fold_layouts(graph)
    fold_batch_norms(graph)
    fuse_activations(graph)
    global_pools(graph)
    return graph
