"""Compiler: a quantized model → an NPU program (instructions + data image).

Layers run back to back on chip, with no host work between them (a model's final softmax
runs on the host: ``Program.host_ops``). Every model is compiled the same way: its
tensors placed in the activation memory, its layers lowered by :mod:`npugen.lowering`,
the memories checked, the cycles counted by the cycle model.

- Every tensor is a :class:`~npugen.featuremap.FeatureMap` with the halo its consumers'
  padding needs (written by the NPU before the layer that makes it); maps whose lifetimes
  do not overlap share activation words. Convolutions are implicit im2col GEMMs, pooling
  runs on the array, and a dense layer is a convolution whose kernel covers one input:
  the whole map.
- A chain of dense layers on vectors (an MLP) runs ``batch`` rows a run, the largest of
  :data:`BATCH_CHOICES` that fits: its tensors are maps of one pixel per row
  (features × 1 × batch) and each layer a 1×1 convolution over them, which the lowering
  emits as a plain GEMM (the schedule of :mod:`npugen.schedule`, which NPUs without the
  feature-map hardware run), followed by REQUANT of each output tile into the next
  layer's map. Any other model runs one image a run.

Accumulators are reused by every layer; weights and parameters stay resident. A model
whose instructions, weights or parameters the NPU cannot hold at once runs in *stages*:
runs of consecutive layers that it can, each an NPU run after the host writes its image,
the activations kept on the NPU between them (``Program.stages``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .config import NpuConfig
from .featuremap import FeatureMap, conv_output_size, stride_pair
from .golden import CycleModel, GemmState, check_program
from .graph import Add, Conv, Dense, Model, Pool, output_shape
from .inplace import ADDRESS_SPACE, in_place_conflict, in_place_gap
from .interleave import interleave
from .isa import Instruction, Opcode, encode_program
from .lowering import Lowering, Requant, Rescale
from .memory_map import Region
from .program import UNIT_KEYS, Program, TensorLayout
from .quantize import POOL_SUM_WEIGHT, QuantizedModel, average_divisor, quantize_model
from .schedule import DoesNotFit, ceil_div

__all__ = ["compile_model", "compile_quantized", "BATCH_CHOICES"]

#: The batches a chain of dense layers may run, largest first.
BATCH_CHOICES = (64, 32, 16, 8, 4, 2, 1)

#: A layer row's cycles (:meth:`_Stage.time`): its own, then each unit's work in them.
LAYER_CYCLE_KEYS = ("cycles", *UNIT_KEYS)


def compile_quantized(model: QuantizedModel, config: NpuConfig,
                      batch: int | None = None, *, input_im2col: bool = True) -> Program:
    """Compile for ``batch`` rows a run (default: the largest of 64, 32, ... that fits; a
    model with feature maps runs one image a run). ``input_im2col``: let the host prepare
    a CNN's input by im2col when that saves the first convolution K tiles. Raises
    ``DoesNotFit`` naming every memory that is too small, ``ValueError`` for a batch the
    model cannot run."""
    if batch is not None and not 1 <= batch <= 0xFFFF:
        raise ValueError(f"batch must be between 1 and 65535, not {batch}")
    for layer in model.layers:
        bias = int(np.abs(layer.bias.astype(np.int64)).max()) if layer.bias.size else 0
        if bias >= 1 << (config.accumulator_width - 1):
            raise DoesNotFit(f"layer {layer.name!r}: a bias of ±{bias} needs "
                             f"{bias.bit_length() + 1}-bit accumulators; this NPU's are "
                             f"{config.accumulator_width}-bit")
    if config.input_width != 8 or config.weight_width != 8:
        raise DoesNotFit(f"models compile to int8 NPUs; this one is {config.describe()}")
    for layer in model.layers:
        rounding = layer.rounding.removesuffix("_even")   # what the hardware must have
        if config.rounding not in ("both", rounding):
            raise DoesNotFit(
                f"layer {layer.name!r} requantizes with {rounding} rounding (the "
                f"arithmetic of its {_io(model).framework} model), but this NPU was "
                f"generated with rounding = {config.rounding!r} only; use rounding = 'both' "
                f"(the default)")
    if _dense_chain(model):
        batches = [batch] if batch else list(BATCH_CHOICES)
    else:
        if batch not in (None, 1):
            raise ValueError(f"a model with feature maps runs one image a run, not batch "
                             f"{batch}")
        if not config.feature_maps:
            raise DoesNotFit(f"the model needs feature-map hardware ({_not_a_chain(model)}); "
                             f"this {config.describe()} NPU was generated without them "
                             f"(feature_maps = false)")
        for layer in model.layers:
            source = layer.source
            if isinstance(source, Pool) and source.kind == "max" and not config.max_pooling:
                raise DoesNotFit(f"layer {layer.name!r} is max pooling, but this "
                                 f"{config.describe()} NPU was generated without it "
                                 f"(max_pooling = false); regenerate it with max_pooling "
                                 f"= true")
            if isinstance(source, Add) and not config.adds:
                raise DoesNotFit(f"layer {layer.name!r} is an add, but this "
                                 f"{config.describe()} NPU was generated without adds "
                                 f"(adds = false); regenerate it with adds = true")
        batches = [1]
    if config.accumulator_width < 32:
        _check_accumulator_reach(model, config)
    im2col = _input_im2col(model, config) if input_im2col else None
    # Where the first convolution's input, by im2col or not, leaves too little room for
    # the maps, the host gives it in phases instead (_input_phases).
    phases = _input_phases(model, config) if input_im2col else None
    problems = []
    for candidate in batches:
        try:
            return _compile(model, config, candidate, im2col)
        except DoesNotFit as error:
            problems.append(str(error))
        if phases is not None:
            try:
                return _compile(model, config, candidate, phases)
            except DoesNotFit as error:
                problems[-1] += f"; with its input in phases, {error}"
    raise DoesNotFit(f"the model does not fit a {config.describe()} NPU: {problems[-1]}")


def _dense_chain(model: QuantizedModel) -> bool:
    """Whether the model is a chain of dense layers on vectors, each reading the one
    before (an MLP), which runs a batch of rows a run."""
    return _not_a_chain(model) is None


def _not_a_chain(model: QuantizedModel) -> str | None:
    """Why the model is not a dense chain (None if it is one), for the refusal of an NPU
    without feature maps."""
    if len(model.input_shape) == 3:
        return f"its input is a {'×'.join(map(str, model.input_shape))} feature map"
    previous = "input"
    for layer in model.layers:
        if not isinstance(layer.source, Dense | None):
            kind = {Conv: "a convolution", Pool: "a pooling layer", Add: "an Add"}
            return f"layer {layer.name!r} is {kind[type(layer.source)]}"
        if tuple(layer.inputs) != (previous,):
            return (f"layer {layer.name!r} reads {', '.join(layer.inputs)}, not only the "
                    f"layer before it ({previous})")
        previous = layer.name
    return None


def _io(model: QuantizedModel) -> Model:
    """The model a quantized model came from, for its layouts, types and host operators
    (a plain float model's defaults when it was built directly)."""
    return model.source if model.source is not None else Model(
        [], model.input_shape, model.output_shape)


def _user_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """A C×H×W shape in the model's own layout (H×W×C for ``hwc``)."""
    shape = tuple(shape)
    return (shape[1], shape[2], shape[0]) if layout == "hwc" and len(shape) == 3 else shape


def compile_model(model: Model | str | Path | Any, config: NpuConfig | None = None,
                  calibration: np.ndarray | None = None, batch: int | None = None) -> Program:
    """Quantize (from ``calibration`` unless the model is QDQ) and compile ``model``: a
    :class:`~npugen.graph.Model`, a path to an ``.onnx``/``.npz`` file or an
    ``onnx.ModelProto``. Raises ``ValueError`` (``ModelError``, ``DoesNotFit``) with the
    reason."""
    from .importers import load_model, load_onnx

    if isinstance(model, (str, Path)):
        model = load_model(model)
    elif not isinstance(model, Model):
        model = load_onnx(model)
    config = config or NpuConfig()
    return compile_quantized(quantize_model(model, calibration), config, batch)


# -- Tensors as maps, layers as operators ----------------------------------------------

def _tensor_shapes(model: QuantizedModel, batch: int = 1) -> dict[str, tuple[int, int, int]]:
    """Every tensor's shape as a map (:func:`_map_shape`; vectors for ``batch`` rows)."""
    shapes = {"input": _map_shape(model.input_shape, batch)}
    for layer in model.layers:
        source = layer.source
        if isinstance(source, Conv | Pool):
            shapes[layer.name] = output_shape(source, shapes[layer.inputs[0]])
        elif isinstance(source, Add):
            shapes[layer.name] = shapes[layer.inputs[0]]
        else:
            shapes[layer.name] = _map_shape((layer.out_features,), batch)
    return shapes


def _check_accumulator_reach(model: QuantizedModel, config: NpuConfig) -> None:
    """Refuse a model whose sums may not fit accumulators narrower than its framework's
    32 bits: they would wrap where TFLite's and ONNX's do not. A layer's accumulator for
    output channel n ends at Σ x·w + bias (the input zero point is folded into the bias),
    whatever order the NPU sums in, so it is exact when |x| ≤ 128 times Σ|w| plus |bias|
    fits (max pooling keeps one product, not a sum). An add scales its inputs by 2**20 on
    their way through the accumulators. The error names the layer that needs the most
    and the width the whole model needs."""
    width = config.accumulator_width
    shapes = _tensor_shapes(model)
    worst = None   # (reach, layer name)
    for layer in model.layers:
        source = layer.source
        if isinstance(source, Add):
            raise DoesNotFit(f"layer {layer.name!r} is an add, whose inputs pass the "
                             f"accumulators scaled by 2**20: it needs 32-bit accumulators, "
                             f"this NPU has {width}; generate it with accumulator_width = 32")
        if isinstance(source, Pool):
            _, height, width_in = shapes[layer.inputs[0]]
            pixels = (1 if source.kind == "max" else height * width_in
                      if source.kind == "global" else int(np.prod(source.window)))
            weight_sum = np.full(max(layer.bias.size, 1), pixels * (
                POOL_SUM_WEIGHT if layer.exact_average else 1), dtype=np.int64)
        else:   # conv (kh, kw, C_in, C_out), depthwise (kh, kw, C), dense (K, N)
            weight = np.abs(layer.weight.astype(np.int64))
            weight_sum = weight.reshape(-1, weight.shape[-1]).sum(axis=0)
        bias = np.abs(layer.bias.astype(np.int64)) if layer.bias.size else 0
        reach = int((128 * weight_sum + bias).max())
        if worst is None or reach > worst[0]:
            worst = (reach, layer.name)
    if worst is not None and worst[0] >= 1 << (width - 1):
        reach, name = worst
        need = min(32, reach.bit_length() + 1)
        raise DoesNotFit(
            f"layer {name!r}: its sums may reach ±{reach}, which needs {need}-bit "
            f"accumulators (its framework sums in 32 bits; no layer of the model needs "
            f"more); this NPU's are {width}-bit: generate it with accumulator_width = "
            f"{need} or more")


def _map_shape(shape: tuple[int, ...], batch: int = 1) -> tuple[int, int, int]:
    """A tensor's shape as a map: a C×H×W map as it is, a vector as a row of ``batch``
    pixels (one a row of the batch), each of its features."""
    return tuple(shape) if len(shape) == 3 else (int(np.prod(shape)), 1, batch)


def _halo(layer, zero_point: int) -> tuple[tuple[int, int, int, int], int]:
    """The halo the input of ``layer`` needs and its fill: the zero point (real 0) for
    convolutions and average pooling, the lowest int8 for max pooling."""
    source = layer.source
    if layer.exact_average:
        return tuple(source.pads), 0   # TFLite sums the pixels present: padding adds 0
    if isinstance(source, Conv) or (isinstance(source, Pool) and source.kind == "avg"):
        return tuple(source.pads), zero_point
    if isinstance(source, Pool) and source.kind == "max":
        return tuple(source.pads), -128
    return (0, 0, 0, 0), zero_point


def _phase_mode_rows(layer, config: NpuConfig,
                     pads: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """``pads`` with the top rows a 3×3 stride-2 depthwise layer's phase mode streams
    above its first output row (``Lowering._phase_tiles``): its lead, 2·G − 3 rows and
    three words, which meet zero weights but must be words of the memory."""
    source = layer.source
    if not (isinstance(source, Conv) and source.depthwise and config.line_buffer_depth
            and tuple(source.kernel) == (3, 3) and stride_pair(source.stride) == (2, 2)):
        return pads
    top, left, bottom, right = pads
    return top + 2 * config.depthwise_groups - 2, left, bottom, right


def _requant(layer) -> Requant:
    return Requant(layer.bias, layer.multiplier, layer.shift, layer.output_zero_point,
                   layer.clamp_min, layer.clamp_max, int(layer.rounding.startswith("single")),
                   int(layer.rounding.endswith("_even")))


def _lower(lowering: Lowering, layer, maps: dict[str, FeatureMap],
           input_im2col: tuple[int, ...] | None = None,
           out_tiles: range | None = None, plain_add: bool = False) -> dict:
    """Emit one layer; returns its row of the layer table. ``input_im2col``: how the host
    prepared the layer's input: by im2col, so it runs as a 1×1 convolution over every
    tap, or in phases (:func:`_input_phases`), a convolution of stride 1.
    ``out_tiles``: only these output tiles of a convolution or dense layer
    (:func:`_splittable`). ``plain_add``: an add without the rescale tables."""
    source, requant = layer.source, _requant(layer)
    src, dst = maps[layer.inputs[0]], maps[layer.name]
    kind = type(source).__name__.lower() if source is not None else "dense"
    macs = ops = 0
    if input_im2col and tuple(input_im2col[:2]) != tuple(source.kernel):
        weight = _phase_weights(layer.weight, input_im2col[2])
        lowering.conv(src, dst, weight, requant, out_tiles=out_tiles)
        macs = dst.height * dst.width * int(np.prod(layer.weight.shape))
        return _layer_row(layer, "conv (input in phases)", src, dst, macs, macs)
    if input_im2col:
        kind = "conv (im2col input)"
        taps = layer.weight.reshape(1, 1, -1, layer.weight.shape[-1])
        lowering.conv(src, dst, taps, requant, out_tiles=out_tiles)
        macs = dst.height * dst.width * int(np.prod(layer.weight.shape))
        return _layer_row(layer, kind, src, dst, macs, macs)
    if isinstance(source, Conv) and source.depthwise:
        in_mode = lowering.depthwise(src, dst, layer.weight, requant, source.stride,
                                     source.pads)
        kind = "depthwise" if not in_mode else (
            "depthwise (line buffers, by phases)" if stride_pair(source.stride) == (2, 2)
            else "depthwise (line buffers)")
        macs = dst.channels * dst.height * dst.width * layer.weight.shape[0] * \
            layer.weight.shape[1]
    elif isinstance(source, Conv):
        lowering.conv(src, dst, layer.weight, requant, source.stride, source.pads,
                      out_tiles=out_tiles)
        macs = dst.height * dst.width * int(np.prod(layer.weight.shape))
    elif isinstance(source, Pool) and source.kind == "global":
        kind = "globalavgpool"
        lowering.global_sum(src, dst, requant,
                            POOL_SUM_WEIGHT if layer.exact_average else 1)
        ops = src.channels * src.height * src.width   # one per element the array adds
    elif isinstance(source, Pool):
        kind = f"{source.kind}pool"
        ones = np.full((*source.window, src.channels),
                       POOL_SUM_WEIGHT if layer.exact_average else 1, dtype=np.int64)
        pixel_requants = None
        if layer.exact_average and any(source.pads):
            pixel_requants = _window_divisors(layer, src, dst, requant)
        lowering.depthwise(src, dst, ones, requant, source.stride, source.pads,
                           combine_max=source.kind == "max", pixel_requants=pixel_requants)
        ops = dst.channels * dst.height * dst.width * int(np.prod(source.window))
    elif isinstance(source, Add):
        first, second = (Rescale(*values) for values in layer.rescales)
        lowering.add(src, maps[layer.inputs[1]], dst, first, second, requant,
                     by_tables=not plain_add)
        ops = 2 * dst.channels * dst.height * dst.width   # both inputs pass the array
    else:  # dense: a convolution whose kernel covers one input (C·H·W flatten order):
        # the whole map, or one pixel of a batch of vectors
        taps = (1, 1) if layer.in_features == src.channels else (src.height, src.width)
        weight = layer.weight.reshape(src.channels, *taps, -1)
        lowering.conv(src, dst, weight.transpose(1, 2, 0, 3), requant, out_tiles=out_tiles)
        macs = int(np.prod(layer.weight.shape))
    return _layer_row(layer, kind, src, dst, macs, ops or macs)


def _window_divisors(layer, src: FeatureMap, dst: FeatureMap,
                     requant: Requant) -> tuple[np.ndarray, dict[int, Requant]]:
    """TFLite's padded average pooling divides each window's sum by the input pixels under
    it: the count of every output pixel, and the requantization dividing by each count."""
    from .featuremap import stride_pair

    (kh, kw), (step_y, step_x) = layer.source.window, stride_pair(layer.source.stride)
    top, left = layer.source.pads[0], layer.source.pads[1]

    def inside(size: int, outputs: int, kernel: int, step: int, before: int) -> np.ndarray:
        start = np.arange(outputs) * step - before
        return np.minimum(start + kernel, size) - np.maximum(start, 0)

    counts = np.outer(inside(src.height, dst.height, kh, step_y, top),
                      inside(src.width, dst.width, kw, step_x, left))
    by_count = {}
    for count in np.unique(counts):
        multiplier, shift = average_divisor(int(count))
        channels = len(requant.bias)
        by_count[int(count)] = replace(requant, multiplier=np.full(channels, multiplier),
                                       shift=np.full(channels, shift))
    return counts, by_count


def _layer_row(layer, kind: str, src: FeatureMap, dst: FeatureMap, macs: int,
               ops: int) -> dict:
    return {"name": layer.name, "kind": kind, "inputs": list(layer.inputs),
            "input": [src.channels, src.height, src.width],
            "output": [dst.channels, dst.height, dst.width], "macs": macs,
            "ops": ops, "clamp": [layer.clamp_min, layer.clamp_max]}


def _host_prepared_conv(model: QuantizedModel) -> Conv | None:
    """The first layer's convolution where the host may prepare its input (by im2col or
    in phases): not depthwise, and the only reader of the input."""
    first = model.layers[0]
    source = first.source
    if not isinstance(source, Conv) or source.depthwise or first.inputs != ("input",):
        return None
    if any("input" in layer.inputs for layer in model.layers[1:]):
        return None
    return source


def _input_im2col(model: QuantizedModel, config: NpuConfig) -> tuple[int, ...] | None:
    """(kh, kw, stride, *pads) when the host should prepare the input by im2col: the first
    layer is a convolution, the only reader of the input, whose kernel taps packed into
    lanes take fewer K tiles than one tap a tile (few input channels)."""
    source = _host_prepared_conv(model)
    if source is None:
        return None
    (kh, kw), channels = source.kernel, source.in_channels
    if ceil_div(kh * kw * channels, config.rows) >= ceil_div(channels, config.rows) * kh * kw:
        return None
    if not isinstance(source.stride, int):   # the host's im2col takes one stride
        return None
    return (kh, kw, source.stride, *source.pads)


def _input_phases(model: QuantizedModel, config: NpuConfig) -> tuple[int, ...] | None:
    """The host's preparation of the input (as :func:`_input_im2col`'s, for
    :func:`~npugen.featuremap.im2col`) that takes the fewest activation words, where the
    first layer is a strided convolution over few channels: its input in phases, the
    ``stride²`` phases of each channel as channels (im2col with a stride × stride kernel),
    padded so that the convolution runs with stride 1, no padding and a kernel
    ``ceil(k / stride)`` square (:func:`_phase_weights`), where that takes fewer words
    than im2col. VWW's 96×96×3 input then takes 49·49 words on a 16-row NPU, where its
    im2col took 48·48·2 (on an 8-row one 49·49·2 against 48·48·4)."""
    source = _host_prepared_conv(model)
    if source is None:
        return None
    stride, (kh, kw), channels = source.stride, source.kernel, source.in_channels
    if not isinstance(stride, int) or stride < 2 or max(kh, kw) <= stride:
        return None
    top, left, bottom, right = source.pads
    _, height, width = _map_shape(model.input_shape, 1)
    out_h = conv_output_size(height, kh, stride, top, bottom)
    out_w = conv_output_size(width, kw, stride, left, right)
    bottom = stride * (out_h + ceil_div(kh, stride) - 1) - height - top
    right = stride * (out_w + ceil_div(kw, stride) - 1) - width - left
    if bottom < 0 or right < 0:
        return None
    # Fewer words than the input by im2col, which takes a word per K tile of every tap.
    phase_words = (ceil_div(stride * stride * channels, config.rows)
                   * (out_h + ceil_div(kh, stride) - 1) * (out_w + ceil_div(kw, stride) - 1))
    if phase_words >= ceil_div(kh * kw * channels, config.rows) * out_h * out_w:
        return None
    return (stride, stride, stride, top, left, bottom, right)


def _phase_weights(weight: np.ndarray, stride: int) -> np.ndarray:
    """A (kh, kw, C, N) kernel as the ``ceil(k / stride)``-square kernel over the input in
    phases (:func:`_input_phases`): tap (a, b) takes, for phase (py, px), channel
    (py·stride + px)·C + c, the weight of tap (stride·a + py, stride·b + px), 0 past the
    kernel."""
    kh, kw, channels, outputs = weight.shape
    phased = np.zeros((ceil_div(kh, stride), ceil_div(kw, stride),
                       stride * stride * channels, outputs), dtype=weight.dtype)
    for dy in range(kh):
        for dx in range(kw):
            phase = (dy % stride) * stride + dx % stride
            phased[dy // stride, dx // stride,
                   phase * channels:(phase + 1) * channels] = weight[dy, dx]
    return phased


def _allocate_maps(model: QuantizedModel, config: NpuConfig, batch: int,
                   input_im2col: tuple[int, ...] | None
                   ) -> tuple[dict[str, FeatureMap], list[str], dict[str, int]]:
    """A feature map for every tensor (vectors for ``batch`` rows), each with the halo its
    consumers' padding needs, what is wrong if they do not fit the activation memory,
    and the layers made in place over their input to fit it (name → gap,
    :mod:`npugen.inplace`)."""
    shapes = _tensor_shapes(model, batch)
    quants = {"input": model.input_quant}
    quants.update({layer.name: layer.output_quant for layer in model.layers})
    if input_im2col is not None:   # every tap (or phase) of every channel, per pixel
        kh, kw, stride, top, left, bottom, right = input_im2col
        channels, height, width = shapes["input"]
        shapes["input"] = (channels * kh * kw,
                           conv_output_size(height, kh, stride, top, bottom),
                           conv_output_size(width, kw, stride, left, right))
    halos: dict[str, tuple[tuple[int, int, int, int], int | None]] = {
        name: ((0, 0, 0, 0), None) for name in shapes}
    for index, layer in enumerate(model.layers):
        name = layer.inputs[0]
        if index == 0 and input_im2col is not None:
            continue   # its input is prepared with the padding in it
        pads, fill = _halo(layer, quants[name].zero_point)
        pads = _phase_mode_rows(layer, config, pads)
        old_pads, old_fill = halos[name]
        if any(pads) and any(old_pads) and old_fill != fill:
            raise DoesNotFit(f"tensor {name!r} is padded with {old_fill} for one consumer and "
                             f"with {fill} for {layer.name!r}; one map has one halo value")
        merged = tuple(max(a, b) for a, b in zip(pads, old_pads, strict=True))
        halos[name] = (merged, fill if any(pads) else old_fill)
    # The right padding from the next row's left halo (FeatureMap.holds_pads), with one
    # more bottom row for the last row's: a word less a row, which the depthwise mode
    # streams, where the map does not grow.
    for name, ((top, left, bottom, right), fill) in halos.items():
        channels, height, width = shapes[name]
        if 0 < right <= left and (top + height + bottom + 1) * (left + width) <= (
                top + height + bottom) * (left + width + right):
            halos[name] = ((top, left, bottom + 1, 0), fill)
    # A dense chain's maps are vectors, which only the host (the input) or a dense layer
    # writes; any other map keeps room for any operator's spill.
    chain = _dense_chain(model)
    unplaced = {}
    for name, shape in shapes.items():
        pads, fill = halos[name]
        spill = ("none" if name == "input" else "tiles") if chain else "any"
        unplaced[name] = FeatureMap(0, *shape, config.rows, config.cols, pads,
                                    quants[name].zero_point if fill is None else fill,
                                    spill)
    maps, end = _place_maps(model, unplaced)
    if end <= config.activation_depth:
        return maps, [], {}
    if chain:
        return maps, [f"activations need {end} words, activation_depth is "
                      f"{config.activation_depth}"], {}
    spans = _lifetimes(model)
    live = [sum(fmap.words for name, fmap in unplaced.items()
                if spans[name][0] <= step <= spans[name][1])
            for step in range(1, len(model.layers) + 1)]
    if end > ADDRESS_SPACE:   # past what instructions address: nothing to count in it
        return maps, [f"its feature maps need {end} activation words, activation_depth is "
                      f"{config.activation_depth}"], {}
    # Layers where too much is live make their output in place over their input: all of
    # them at once, and one at a time, the most crowded first, each kept unless the maps
    # then take more words (one refused is tried again after another is kept). The
    # placement that takes the fewest words is kept, and reported if it is too many.
    crowded = {layer.name for layer, words in zip(model.layers, live, strict=True)
               if words > config.activation_depth}
    gaps = _in_place_gaps(model, config, maps, crowded, input_im2col)
    best = (end, maps, {}, live)
    if gaps:   # all at once: one alone may not lower the peak that its neighbours keep
        placed, trial_end = _place_maps(model, unplaced, gaps)
        best = min(best, (trial_end, placed, gaps, _live_words(model, placed)),
                   key=lambda found: found[0])
    in_place: dict[str, int] = {}
    refused: set[str] = set()
    while best[0] > config.activation_depth:
        step_live = dict(zip((layer.name for layer in model.layers), live, strict=True))
        candidates = sorted((name for name in gaps if name not in {*in_place, *refused}),
                            key=lambda name: -step_live[name])
        if not candidates:
            break
        trial = {**in_place, candidates[0]: gaps[candidates[0]]}
        placed, trial_end = _place_maps(model, unplaced, trial)
        if trial_end > end:
            refused.add(candidates[0])
            continue
        maps, end, in_place, refused = placed, trial_end, trial, set()
        live = _live_words(model, maps)
        best = min(best, (end, maps, in_place, live), key=lambda found: found[0])
    end, maps, in_place, live = best
    if end <= config.activation_depth:
        return maps, [], in_place
    peak = int(np.argmax(live))
    return maps, [f"its feature maps need {end} activation words, activation_depth is "
                  f"{config.activation_depth} (most at layer {model.layers[peak].name!r}, "
                  f"where maps of {live[peak]} words are live at once"
                  f"{f', {len(in_place)} made in place' if in_place else ''})"], {}


def _live_words(model: QuantizedModel, maps: dict[str, FeatureMap]) -> list[int]:
    """At each layer, the words between the lowest and highest word of the maps live."""
    spans = _lifetimes(model)
    live = []
    for step in range(1, len(model.layers) + 1):
        here = [fmap for name, fmap in maps.items() if spans[name][0] <= step <= spans[name][1]]
        live.append(max(f.end for f in here) - min(f.base for f in here))
    return live


def _in_place_gaps(model: QuantizedModel, config: NpuConfig, maps: dict[str, FeatureMap],
                   names: set[str], input_im2col: tuple[int, ...] | None) -> dict[str, int]:
    """Layer name → the gap its output needs below its input to be made in place over it
    (:func:`~npugen.inplace.in_place_gap`), for each layer of ``names`` that may: one
    input, which no later layer reads, read by a convolution or pooling (an add
    requantizes into the accumulators). ``maps``: placed apart."""
    spans = _lifetimes(model)
    gaps = {}
    for step, layer in enumerate(model.layers, start=1):
        if (layer.name not in names or len(layer.inputs) != 1
                or spans[layer.inputs[0]][1] != step or isinstance(layer.source, Add)):
            continue
        lowering = Lowering(config, check_depths=False)
        if step > 1:   # as after other layers: their walks set (Lowering._plain_gemm)
            lowering.instructions.append(Instruction(Opcode.SETWIN, {}))
        try:
            _lower(lowering, layer, maps, input_im2col if step == 1 else None)
        except DoesNotFit:
            continue   # the compiler says why, without the layer in place
        lowering.fill_halo_now(maps[layer.name])
        try:
            gaps[layer.name] = in_place_gap(config, lowering.instructions,
                                            maps[layer.inputs[0]], maps[layer.name])
        except ValueError:
            continue   # it requantizes into the accumulators: not made in place
    return gaps


def _lifetimes(model: QuantizedModel) -> dict[str, tuple[int, int]]:
    """(first, last) step each tensor is live: the input from step 0, layer k's output from
    step k + 1, each to the last step that reads it (the model's output to the end)."""
    spans = {"input": (0, 0)}
    for step, layer in enumerate(model.layers, start=1):
        spans[layer.name] = (step, step)
        for name in layer.inputs:
            spans[name] = (spans[name][0], step)
    last = model.layers[-1].name
    spans[last] = (spans[last][0], len(model.layers) + 1)
    return spans


def _place_maps(model: QuantizedModel, maps: dict[str, FeatureMap],
                in_place: dict[str, int] | None = None
                ) -> tuple[dict[str, FeatureMap], int]:
    """Activation addresses for every map, sharing space between maps whose lifetimes do
    not overlap (halos are written at run time, :meth:`Lowering.fill_halo`); returns the
    maps at their bases and the words used. Largest first, each at the lowest address
    free for its lifetime; a dense chain's maps alternate between two areas instead (the
    input and the outputs of its second, fourth, ... layer from word 0, the others after
    the largest of those), the layout its batch choice has always been made with.
    ``in_place``: layer name → gap; that layer's output goes ``gap`` words below its
    input (:mod:`npugen.inplace`), the two placed together."""
    if _dense_chain(model):
        names = ["input", *(layer.name for layer in model.layers)]
        split = max(maps[name].words for name in names[0::2])
        end = split + max(maps[name].words for name in names[1::2])
        return {name: replace(maps[name], base=split if index % 2 else 0)
                for index, name in enumerate(names)}, end
    spans = _lifetimes(model)
    groups = _in_place_groups(model, maps, in_place or {})

    def overlaps(a: str, b: str) -> bool:
        return spans[a][0] <= spans[b][1] and spans[b][0] <= spans[a][1]

    def place(order: list[list[tuple[str, int]]]) -> tuple[dict[str, int], int]:
        bases: dict[str, int] = {}
        end = 0
        for group in order:
            # The lowest anchor at which every member is clear of the maps placed that
            # live beside it: 0, or a member just after such a map.
            anchors = sorted({0, *(bases[o] + maps[o].words - offset
                                   for name, offset in group for o in bases
                                   if overlaps(name, o))})
            for anchor in anchors:
                if anchor >= 0 and all(
                        anchor + offset + maps[name].words <= bases[o]
                        or bases[o] + maps[o].words <= anchor + offset
                        for name, offset in group for o in bases if overlaps(name, o)):
                    break
            for name, offset in group:
                bases[name] = anchor + offset
                end = max(end, bases[name] + maps[name].words)
        return bases, end

    def size(group: list[tuple[str, int]]) -> int:
        return max(offset + maps[name].words for name, offset in group)

    def first(group: list[tuple[str, int]]) -> int:
        return min(spans[name][0] for name, _ in group)

    def last(group: list[tuple[str, int]]) -> int:
        return max(spans[name][1] for name, _ in group)

    # The orders tried, the first kept on a tie (it was the only one before): largest
    # first, then longest-lived first, then in the order the maps are made.
    orders = [sorted(groups, key=key) for key in (
        lambda g: (-size(g), first(g)),
        lambda g: (first(g) - last(g), -size(g), first(g)),
        lambda g: (first(g), -size(g)))]
    bases, end = min((place(order) for order in orders), key=lambda placed: placed[1])
    return {name: replace(fmap, base=bases[name]) for name, fmap in maps.items()}, end


def _in_place_groups(model: QuantizedModel, maps: dict[str, FeatureMap],
                     in_place: dict[str, int]) -> list[list[tuple[str, int]]]:
    """The maps as groups placed together, each (name, offset from the group's lowest
    word): a map alone, or a chain of maps each made in place over the one before."""
    inputs = {layer.name: layer.inputs[0] for layer in model.layers}
    offset: dict[str, int] = {}
    root: dict[str, str] = {}
    for name in maps:   # inputs before outputs: the model's order
        if name in in_place:
            source = inputs[name]
            root[name] = root[source]
            offset[name] = offset[source] - in_place[name]
        else:
            root[name], offset[name] = name, 0
    members: dict[str, list[str]] = {}
    for name in maps:
        members.setdefault(root[name], []).append(name)
    groups = []
    for names in members.values():
        low = min(offset[name] for name in names)
        groups.append([(name, offset[name] - low) for name in names])
    return groups


def _compile(model: QuantizedModel, config: NpuConfig, batch: int,
             input_im2col: tuple[int, ...] | None) -> Program:
    """The program of ``model`` for ``batch`` rows a run: tensors placed, layers lowered,
    memories checked, cycles counted. Raises ``DoesNotFit`` naming every memory that is
    too small (after ``batch N:`` for a dense chain)."""
    chain = _dense_chain(model)
    prefix = f"batch {batch}: " if chain else ""
    maps, problems, in_place = _allocate_maps(model, config, batch, input_im2col)
    # Without the feature-map hardware a dense chain's batch keeps each layer's output
    # tiles in the accumulators at once: a plain GEMM per layer, then its REQUANTs. With
    # it, a layer whose tiles do not fit at once goes a tile at a time (Lowering._emit).
    accumulators = [("accumulators", batch * max(
        ceil_div(layer.out_features, config.cols) for layer in model.layers),
        "accumulator_depth")] if chain and not config.feature_maps else []
    if max(fmap.end for fmap in maps.values()) > 1 << 16:
        # Past what the instructions address: there is no program to count the rest in.
        raise DoesNotFit(prefix + "; ".join(problems + _overflows(config, accumulators)))
    try:
        stages, layers = _lower_with_tables(model, config, maps, input_im2col,
                                            set(in_place))
    except DoesNotFit as error:   # an operator that no memory of this NPU can hold
        raise DoesNotFit(prefix + "; ".join(
            problems + _overflows(config, accumulators) + [str(error)])) from None
    problems += _overflows(config, accumulators)
    for stage in stages:
        problems += stage.overflows(config, model)
    if problems:
        raise DoesNotFit(prefix + "; ".join(problems))
    cycles = 0
    for stage in stages:
        stage.finish(config)
        cycles += stage.time(config, layers)
    for row in layers:
        # Pooling does no MACs; its utilization counts one operation per window element.
        # A row's ops are one inference's, its cycles a run's (a dense chain's batch).
        row["utilization"] = round(row["ops"] * batch / (config.macs_per_cycle
                                                         * row["cycles"]), 4)
    layers[0]["input"] = list(_map_shape(model.input_shape))   # before any im2col
    images = [stage.image() for stage in stages]
    if len(stages) > 1:
        for number, stage in enumerate(stages):
            for index in stage.layers:
                layers[index].setdefault("stages", []).append(number)
    # Halos (and the spare lanes) start out as their fill; runs only write pixels.
    source = _io(model)
    first, last = maps["input"], maps[model.layers[-1].name]
    if chain:   # vectors, batch-major in each channel tile (TensorLayout)
        inputs = TensorLayout(first.base, first.channels, model.input_shape,
                              model.input_quant.scale, model.input_quant.zero_point,
                              dtype=source.input_dtype)
        output = TensorLayout(last.base, last.channels, model.output_shape,
                              model.output_quant.scale, model.output_quant.zero_point,
                              dtype=source.output_dtype)
        layers = [{**_vector_row(config, layer), "kind": row["kind"],
                   **{key: row[key] for key in (*LAYER_CYCLE_KEYS, "utilization")},
                   **({"stages": row["stages"]} if "stages" in row else {})}
                  for layer, row in zip(model.layers, layers, strict=True)]
    else:
        inputs = _map_layout(first, model.input_shape, model.input_quant,
                             source.input_layout, source.input_dtype, input_im2col)
        output = _map_layout(last, model.output_shape, model.output_quant,
                             source.output_layout, source.output_dtype)
    return Program(
        config=config, batch=batch, segments=images[0], input=inputs, output=output,
        layers=layers, estimated_cycles=cycles,
        instruction_count=sum(len(stage.instructions) for stage in stages),
        framework=source.framework, host_ops=source.host_ops,
        stages=images if len(images) > 1 else [])


@dataclass
class _Stage:
    """Consecutive layers whose instructions, weights and parameters the NPU holds at
    once: one run of the NPU, after the host writes its image (a program in stages)."""

    lowering: Lowering
    layers: list[int] = field(default_factory=list)   # indices into the model's layers
    starts: list[int] = field(default_factory=list)   # where each begins, in instructions
    instructions: list[Instruction] = field(default_factory=list)   # after finish()
    origins: list[int] = field(default_factory=list)   # each one's index before interleave
    out_tiles: range | None = None   # a part of a layer: its output tiles
    plain_adds: frozenset[str] = frozenset()   # adds lowered without the rescale tables
    # An instruction a layer put among the layers' before it (an add's TABLE): its index
    # before interleave -> the layer's, whose work it is.
    inserted_by: dict[int, int] = field(default_factory=dict)

    def lower(self, model: QuantizedModel, index: int, maps: dict[str, FeatureMap],
              input_im2col: tuple[int, ...] | None, out_tiles: range | None = None,
              in_place: bool = False) -> dict:
        """Emit layer ``index`` at the end of the stage (``out_tiles``: those of its output
        tiles, a part of it; the first part writes its map's halo, beside its GEMMs, or
        after them for a layer ``in_place`` over its input); its row of the layer
        table."""
        layer = model.layers[index]
        self.layers.append(index)
        self.starts.append(len(self.lowering.instructions))
        inserted = len(self.lowering.insertions)
        plain = layer.name in self.plain_adds
        if in_place:
            row = _lower(self.lowering, layer, maps, input_im2col, out_tiles, plain)
            self.lowering.fill_halo_now(maps[layer.name])
            row = {**row, "kind": f"{row['kind']}, in place"}
        else:
            if out_tiles is None or out_tiles.start == 0:
                self.lowering.fill_halo(maps[layer.name])
            row = _lower(self.lowering, layer, maps, input_im2col, out_tiles, plain)
        # An instruction the layer put among the layers' before it (an add's TABLE, beside
        # their last GEMM) counts as theirs: the layers after it begin one later.
        for at in self.lowering.insertions[inserted:]:
            self.starts = [start + (start > at) for start in self.starts]
            self.inserted_by = {where + (where >= at): by
                                for where, by in self.inserted_by.items()}
            self.inserted_by[at] = len(self.layers) - 1
        return row

    def needs(self) -> list[tuple[str, int, str]]:
        """(what, words, depth field) of each memory the stage fills."""
        return [("weights", self.lowering.weight_end, "weight_depth"),
                ("parameters", self.lowering.param_end, "param_depth"),
                ("instructions", self.lowering.instructions_at_end() + 1, "instruction_depth")]

    def overflows(self, config: NpuConfig, model: QuantizedModel) -> list[str]:
        """What the stage needs beyond the memories: a layer too large for a stage of its
        own (the memories of one run) names itself."""
        if len(self.layers) > 1:
            return _overflows(config, self.needs())
        name = model.layers[self.layers[0]].name
        alone = (f" for layer {name!r} alone" if self.out_tiles is None else
                 f" for {len(self.out_tiles)} output tile of layer {name!r} alone")
        return [f"{what} need {used} words{alone}, {field} is {getattr(config, field)}"
                for what, used, field in self.needs() if used > getattr(config, field)]

    def finish(self, config: NpuConfig) -> None:
        """End the stage: pending FILLs, HALT, the REQUANTs' overlap, checked."""
        self.lowering.flush_fills()
        instructions = self.lowering.instructions + [Instruction(Opcode.HALT)]
        self.instructions, self.origins = interleave(config, instructions)
        check_program(config, self.instructions)

    def time(self, config: NpuConfig, layers: list[dict]) -> int:
        """The stage's cycles (one run) from the cycle model (which the RTL's counters
        equal), written into its layers' rows. A cycle in which the array streams a
        layer's rows is that layer's; one in which it idles belongs to the layer of the
        instruction the sequencer dispatches next (the one waiting: a requant-bound
        layer's REQUANT, an add's passes). So every MAC of a layer falls within its own
        cycles, though layers overlap (requant_overlap, and the GEMMs
        :func:`~npugen.interleave.interleave` moves), and the rows add up to the run's
        cycles; the first layer also counts the run's start.

        Each row also gets the work of the units, wherever it falls: ``array_cycles``,
        the cycles the array streams the layer's words; ``load_cycles``, those the weight
        loader shifts its tiles in (``load_rows`` a tile); ``requant_cycles``, those the
        requantizer spends on its REQUANTs and FILLs (from the start of each until it is
        free for the next); ``table_cycles``, those the rescale unit spends loading its
        tables (TABLE, the add's that put it beside an earlier layer's GEMM) and looking
        words up (RESCALE, until its last write). The largest, against ``cycles``, says
        what bounds the layer."""
        timing, state = CycleModel(config), GemmState(config.rows)
        layer_of = np.searchsorted(self.starts, self.origins, side="right") - 1
        dispatched, dispatch_layer, streams = [], [], []
        # array, loads, requantizer, rescale unit
        work = np.zeros((len(self.layers), len(UNIT_KEYS)), dtype=np.int64)
        for index, instruction in enumerate(self.instructions):
            for step in state.expand(instruction):
                timing.dispatch(step)
                dispatched.append(timing.next_cycle - 1)
                dispatch_layer.append(int(layer_of[index]))
                if step.opcode is Opcode.MATMUL:
                    streams.append((dispatched[-1], step["count"], dispatch_layer[-1]))
                    work[dispatch_layer[-1], 0] += step["count"]
                elif step.opcode is Opcode.LOADW:
                    work[dispatch_layer[-1], 1] += config.load_rows
                elif step.opcode in (Opcode.REQUANT, Opcode.FILL):
                    work[dispatch_layer[-1], 2] += (timing.requant_free_at
                                                    - timing.requant_started_at)
                elif step.opcode is Opcode.TABLE:   # on the requantizer's parameter port
                    owner = self.inserted_by.get(self.origins[index], dispatch_layer[-1])
                    work[owner, 3] += timing.table_free_at - timing.requant_started_at
                elif step.opcode is Opcode.RESCALE:
                    work[dispatch_layer[-1], 3] += timing.blocked_until - dispatched[-1]
        total = timing.counters.cycles
        waiting = np.searchsorted(dispatched, np.arange(total), side="left")
        owner = np.asarray(dispatch_layer)[np.minimum(waiting, len(dispatched) - 1)]
        for start, count, layer in streams:
            owner[start:start + count] = layer
        for local, cycles in enumerate(np.bincount(owner, minlength=len(self.layers))):
            # A layer split across stages: the sum of its parts.
            index = self.layers[local]
            for key, value in zip(LAYER_CYCLE_KEYS, (cycles, *work[local]), strict=True):
                layers[index][key] = layers[index].get(key, 0) + int(value)
        return total

    def image(self) -> list[tuple[Region, int, np.ndarray]]:
        """What the host writes before the stage runs."""
        return [(Region.INSTRUCTIONS, 0, encode_program(self.instructions)),
                (Region.WEIGHTS, 0, self.lowering.weights()),
                (Region.PARAMS, 0, self.lowering.params())]


def _lower_with_tables(model: QuantizedModel, config: NpuConfig,
                       maps: dict[str, FeatureMap], input_im2col: tuple[int, ...] | None,
                       in_place: set[str]) -> tuple[list[_Stage], list[dict]]:
    """:func:`_lower_stages`, on an NPU with the rescale tables the plan of fewest stages
    (a stage more is the whole program over the link every run) among: every add by
    tables, the first adds only (the largest maps; each TABLE takes parameter words),
    none (an add without them takes more instructions and accumulator words). On a tie,
    the most tables. A plan that does not fit is passed over; if none fits, the error is
    that of every add by tables."""
    adds = [layer.name for layer in model.layers if isinstance(layer.source, Add)]
    if not (config.rescale_tables and adds):
        return _lower_stages(model, config, maps, input_im2col, in_place)
    best, error = None, None
    for count in range(len(adds), -1, -1):   # tables for the first `count` adds
        try:
            trial = _lower_stages(model, config, maps, input_im2col, in_place,
                                  frozenset(adds[count:]))
        except DoesNotFit as failed:
            error = error or failed
            continue
        if best is None or len(trial[0]) < len(best[0]):
            best = trial
        if len(best[0]) == 1:
            break
    if best is None:
        raise error
    return best


def _lower_stages(model: QuantizedModel, config: NpuConfig, maps: dict[str, FeatureMap],
                  input_im2col: tuple[int, ...] | None, in_place: set[str] = frozenset(),
                  plain_adds: frozenset[str] = frozenset()
                  ) -> tuple[list[_Stage], list[dict]]:
    """Every layer lowered, in stages: a layer that would take a stage past the NPU's
    weight, parameter or instruction memory begins the next one (one stage when the
    whole model fits). The activations stay on the NPU from stage to stage. Returns the
    stages (to :meth:`_Stage.finish`) and the layer table's rows. ``plain_adds``: adds
    lowered without the rescale tables."""
    stages = [_Stage(Lowering(config, check_depths=False), plain_adds=plain_adds)]
    rows = []
    for index, layer in enumerate(model.layers):
        stage = stages[-1]
        before = copy.deepcopy(stage)
        im2col = input_im2col if index == 0 else None
        made_in_place = layer.name in in_place
        row = stage.lower(model, index, maps, im2col, in_place=made_in_place)
        if len(stage.layers) > 1 and _overflows(config, stage.needs()):
            stages[-1] = before
            stage = _Stage(Lowering(config, check_depths=False), plain_adds=plain_adds)
            stages.append(stage)
            row = stage.lower(model, index, maps, im2col, in_place=made_in_place)
        if _overflows(config, stage.needs()) and _splittable(layer, config):
            if made_in_place:
                raise DoesNotFit(f"layer {layer.name!r} would run in parts, a stage each, "
                                 f"and is made in place over its input, which a part "
                                 f"would overwrite before the next part reads it")
            # Too large for a stage of its own: in parts of as many output tiles as fit.
            stages.pop()
            tiles = ceil_div(maps[layer.name].channels, config.cols)
            first = 0
            while first < tiles:
                part = _largest_part(model, index, maps, im2col, config, first, tiles)
                stages.append(part)
                if _overflows(config, part.needs()):
                    break   # not even one output tile fits: the part reports it
                first = part.out_tiles.stop
            stage = stages[-1]
        rows.append(row)
    for stage in stages:   # each layer made in place checked where the compiler put it
        ends = [*stage.starts[1:], len(stage.lowering.instructions)]
        for index, start, end in zip(stage.layers, stage.starts, ends, strict=True):
            layer = model.layers[index]
            if layer.name in in_place:
                clash = in_place_conflict(config, stage.lowering.instructions,
                                          range(start, end), maps[layer.inputs[0]],
                                          maps[layer.name])
                if clash:
                    raise DoesNotFit(f"layer {layer.name!r} cannot write its output over "
                                     f"its input: {clash} (a limit of the compiler)")
    return stages, rows


def _splittable(layer, config: NpuConfig) -> bool:
    """Whether a layer can run in parts of its output tiles, a stage each: a convolution
    (not depthwise) or a dense layer, on an NPU with the feature-map hardware."""
    source = layer.source
    return config.feature_maps and (
        source is None or isinstance(source, Dense)
        or isinstance(source, Conv) and not source.depthwise)


def _largest_part(model: QuantizedModel, index: int, maps: dict[str, FeatureMap],
                  im2col: tuple[int, ...] | None, config: NpuConfig, first: int,
                  tiles: int) -> _Stage:
    """A stage of layer ``index``'s output tiles from ``first``: as many as fit (at least
    one, whose overflow the stage then reports)."""
    def part(count: int) -> _Stage:
        stage = _Stage(Lowering(config, check_depths=False))
        stage.lower(model, index, maps, im2col, range(first, first + count))
        stage.out_tiles = range(first, first + count)
        return stage

    low, high = 1, tiles - first   # fits(low) assumed; bisect for the largest
    best = part(1)
    while low < high:
        middle = (low + high + 1) // 2
        trial = part(middle)
        if _overflows(config, trial.needs()):
            high = middle - 1
        else:
            low, best = middle, trial
    return best


def _overflows(config: NpuConfig, needs: list[tuple[str, int, str]]) -> list[str]:
    """What each too small memory of ``needs`` (what, words, depth field) needs."""
    return [f"{what} need {used} words, {name} is {getattr(config, name)}"
            for what, used, name in needs if used > getattr(config, name)]


def _map_layout(fmap: FeatureMap, shape: tuple[int, ...], quant, order: str, dtype: str,
                im2col: tuple[int, ...] | None = None) -> TensorLayout:
    """A model input or output held in ``fmap``, as the host gives or takes it."""
    return TensorLayout(fmap.base, int(np.prod(shape)), _user_shape(shape, order),
                        quant.scale, quant.zero_point,
                        (fmap.channels, fmap.height, fmap.width), fmap.halo, fmap.fill,
                        im2col, order, dtype)


def _vector_row(config: NpuConfig, layer) -> dict:
    """A dense chain's row of the layer table: features, tiles, weight words, MACs."""
    k_tiles = ceil_div(layer.in_features, config.rows)
    n_tiles = ceil_div(layer.out_features, config.cols)
    return {"name": layer.name, "in_features": layer.in_features,
            "out_features": layer.out_features, "output": [layer.out_features],
            "k_tiles": k_tiles, "n_tiles": n_tiles,
            "weight_words": n_tiles * k_tiles * config.rows,
            "macs": layer.in_features * layer.out_features,
            "clamp": [layer.clamp_min, layer.clamp_max]}
