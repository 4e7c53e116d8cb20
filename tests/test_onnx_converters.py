"""ONNX as converters write it (issue 20): tf2onnx's conversions of the four MLPerf Tiny
models and PyTorch's exports (TorchScript and dynamo) of similar float networks.

The reference is onnxruntime with graph optimizations off (``reference_session``), which
runs each QDQ node as defined: float32 Conv/MatMul/AveragePool between DequantizeLinear
and QuantizeLinear. npugen computes the exact integer sum and rounds the rescaled value
once. Where onnxruntime's float32 sum lands on the other side of a rounding half than the
exact value, the two differ by a step: each layer is checked alone, fed onnxruntime's own
input, and every difference must be such a case (within the float32 error bound of a half,
or, for a pooling over 2^k pixels, an exact half, which onnxruntime rounds by its float32
summation order).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import MLPERF_TINY, reference_session
from npugen.compiler import compile_model
from npugen.graph import Add, Conv, Model, ModelError, Pool
from npugen.importers import load_onnx
from npugen.mlperf import REFERENCE_CONFIG
from npugen.runtime import run

TF2ONNX = MLPERF_TINY / "onnx"
TORCH = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "torch"
#: float32's unit roundoff.
EPSILON = 2.0 ** -24

# name, inputs checked, NHWC input shape or features, classes after a Softmax (or None)
MODELS = {
    "ad01_int8": (32, (640,), None),
    "kws_ref_model": (6, (49, 10, 1), 12),
    "pretrainedResnet_quant": (3, (32, 32, 3), 10),
    "vww_96_int8": (2, (96, 96, 3), 2),
}
SLOW = {"vww_96_int8"}


def model_params():
    return [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [], id=name)
            for name in MODELS]


def random_input(name: str, seed: int = 0) -> np.ndarray:
    count, shape, _ = MODELS[name]
    return np.random.default_rng(seed).integers(-128, 128, (count, *shape)).astype(np.int8)


def onnxruntime_tensors(path: Path, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """onnxruntime's output and every QuantizeLinear's output (one per layer, in order,
    then the Softmax's), one input at a time."""
    proto = onnx.load(str(path))
    names = [n.output[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    for name in names:
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT8, None))
    changed = path.parent / "_all_outputs.onnx"
    session = _session(proto, changed)
    runs = [session.run(None, {session.get_inputs()[0].name: x[i:i + 1]})
            for i in range(len(x))]
    stacked = [np.concatenate([r[j] for r in runs]) for j in range(len(runs[0]))]
    return stacked[0], stacked[1:]


def _session(proto, path: Path):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / path.name
        onnx.save(proto, str(target))
        return reference_session(target)


def exact_values(layer, x: np.ndarray, input_zero: int, scale: np.ndarray):
    """A Conv's or Dense's exact rescaled value acc·s_in·s_w/s_out (before the output
    zero point) and the float32 error bound of onnxruntime's sum, in output steps."""
    centered = x.astype(np.float64) - input_zero
    exact_layer = dataclasses.replace(layer, weight=layer.quantized_weight.astype(np.float64),
                                      bias=layer.quantized_bias.astype(np.float64),
                                      low=-np.inf, high=np.inf)
    magnitude_layer = dataclasses.replace(exact_layer, weight=np.abs(exact_layer.weight),
                                          bias=np.abs(exact_layer.bias))
    if isinstance(layer, Conv):
        acc, size = exact_layer.forward(centered), np.prod(layer.weight.shape[:-1])
        magnitude = magnitude_layer.forward(np.abs(centered))
        scale = scale.reshape(1, -1, 1, 1)
    else:
        flat = centered.reshape(len(x), -1)
        acc, size = flat @ exact_layer.weight + exact_layer.bias, layer.in_features
        magnitude = np.abs(flat) @ magnitude_layer.weight + magnitude_layer.bias
    exact = (acc.astype(np.float64) * scale).reshape(len(x), -1)
    bound = (size + 4) * EPSILON * (magnitude * scale).reshape(len(x), -1)
    return exact, bound


def check_layers(path: Path, x: np.ndarray) -> dict[str, tuple[int, int]]:
    """Each single-input layer alone on the golden model, fed onnxruntime's input to it,
    against onnxruntime's output of it. Returns {layer: (differences, outputs)}; fails on
    a difference that float32 summation cannot explain."""
    model = load_onnx(path)
    _, tensors = onnxruntime_tensors(path, x)
    shapes = model.shapes()
    shape_of = dict(zip(["input"] + [layer.name for layer in model.layers], shapes,
                        strict=True))
    produced = {"input": x}
    for index, layer in enumerate(model.layers):
        produced[layer.name] = tensors[index]
    found = {}
    for index, layer in enumerate(model.layers):
        names = model.input_names(index)
        if isinstance(layer, Add):
            continue    # two inputs: checked in the whole model (test_end_to_end)
        source = names[0]
        quant_in, quant_out = model.tensor_quant[source], model.tensor_quant[layer.name]
        alone = dataclasses.replace(layer, inputs=())
        single = Model([alone], shape_of[source], shapes[index + 1],
                       tensor_quant={"input": quant_in, alone.name: quant_out},
                       framework="onnx", input_dtype="int8", output_dtype="int8",
                       input_layout=model.input_layout if source == "input" else "chw")
        given = produced[source]
        given = given.reshape(len(x), *(x.shape[1:] if source == "input" else
                                        shape_of[source]))
        ours = run(compile_model(single, REFERENCE_CONFIG), given).quantized_output
        theirs = produced[layer.name].reshape(len(x), -1)
        differ = ours.astype(np.int64) != theirs
        found[layer.name] = (int(differ.sum()), differ.size)
        if not differ.any():
            continue
        chw = given if source != "input" or model.input_layout == "chw" else \
            np.moveaxis(given, -1, 1)
        if isinstance(layer, Pool):
            # An exact half of (Σ(q − z))/n: npugen rounds it to even, as ONNX defines;
            # onnxruntime's float32 sum lands on either side of it.
            assert layer.kind == "global" and quant_in == quant_out, layer.name
            pixels = int(np.prod(shape_of[source][1:]))
            sums = (chw.reshape(len(x), shape_of[source][0], -1).astype(np.int64)
                    - quant_in.zero_point).sum(-1)
            assert np.all((2 * sums[differ]) % (2 * pixels) == pixels), layer.name
            even = np.round(sums / pixels).astype(np.int64) + quant_out.zero_point
            assert np.array_equal(ours[differ], even[differ]), layer.name
            continue
        weight_scale = np.broadcast_to(np.asarray(layer.weight_quant.scale, np.float64),
                                       (layer.out_features,))
        exact, bound = exact_values(layer, chw, quant_in.zero_point,
                                    quant_in.scale * weight_scale / quant_out.scale)
        distance = np.abs(exact - np.floor(exact) - 0.5)
        assert np.all(distance[differ] <= bound[differ]), (layer.name, distance[differ])
    return found


@pytest.mark.parametrize("name", model_params())
def test_tf2onnx_layers_match_onnxruntime(name):
    found = check_layers(TF2ONNX / f"{name}.onnx", random_input(name, seed=1))
    assert found


@pytest.mark.parametrize("name", model_params())
def test_tf2onnx_end_to_end(name):
    """The whole model on the golden model: npugen's int8 output (after the host's
    Softmax) equals onnxruntime's on these inputs; ResNet-8's 8×8 pooling meets exact
    halves (about 1 output in 64), which onnxruntime rounds by its float32 summation
    order, so there the logits before the pooling are compared."""
    path = TF2ONNX / f"{name}.onnx"
    model = load_onnx(path)
    x = random_input(name)
    program = compile_model(model, REFERENCE_CONFIG)
    expected, tensors = onnxruntime_tensors(path, x)
    ours = run(program, x)
    assert ours.quantized_output.dtype == np.int8
    if name == "pretrainedResnet_quant":
        pooled = model.layers.index(next(la for la in model.layers if isinstance(la, Pool)))
        before = dataclasses.replace(model, layers=model.layers[:pooled],
                                     output_shape=model.shapes()[pooled], host_ops=[])
        prefix = run(compile_model(before, REFERENCE_CONFIG), x).quantized_output
        assert np.array_equal(prefix, tensors[pooled - 1].reshape(len(x), -1))
        return
    differ = np.any(ours.quantized_output != expected.reshape(len(x), -1), axis=1)
    if differ.any():
        # onnxruntime's float32 sums depend on the CPU's kernels: an input whose output
        # differs must have a layer where onnxruntime lands across a rounding half, which
        # check_layers finds and explains (it fails on any other difference).
        found = check_layers(path, x[differ])
        assert any(count for count, _ in found.values()), (
            f"outputs of inputs {np.flatnonzero(differ)} differ from onnxruntime's, yet "
            f"every layer alone agrees")


def test_tf2onnx_models_as_npugen_reads_them():
    kws = load_onnx(TF2ONNX / "kws_ref_model.onnx")
    assert (kws.input_shape, kws.input_layout, kws.input_dtype) == ((1, 49, 10), "hwc", "int8")
    assert (kws.output_shape, kws.output_dtype) == ((12,), "int8")
    assert kws.host_ops == [{"op": "float_softmax", "axis": -1, "output_scale": 1 / 256,
                             "output_zero_point": -128}]
    assert [layer.name for layer in kws.layers][:2] == ["functional_1/conv2d",
                                                         "functional_1/depthwise_conv2d"]
    assert kws.layers[-2].kind == "global"      # the 25×5 AveragePool over the whole map
    resnet = load_onnx(TF2ONNX / "pretrainedResnet_quant.onnx")
    assert (resnet.input_shape, resnet.input_layout) == ((3, 32, 32), "hwc")
    ad01 = load_onnx(TF2ONNX / "ad01_int8.onnx")
    assert (ad01.input_dtype, ad01.output_dtype, ad01.host_ops) == ("int8", "int8", [])


def test_tf2onnx_compile_and_run_cli(tmp_path, capsys):
    from npugen.cli import main

    x = random_input("kws_ref_model")
    np.save(tmp_path / "x.npy", x)
    assert main(["compile", str(TF2ONNX / "kws_ref_model.onnx"), "--activation-depth",
                 "16384", "--weight-depth", "65536", "--accumulator-depth", "1024",
                 "--instruction-depth", "4096", "--param-depth", "512",
                 "-o", str(tmp_path / "kws.npu")]) == 0
    assert main(["run", str(tmp_path / "kws.npu"), "--input", str(tmp_path / "x.npy"),
                 "-o", str(tmp_path / "y.npy")]) == 0
    y = np.load(tmp_path / "y.npy")
    program = compile_model(load_onnx(TF2ONNX / "kws_ref_model.onnx"), REFERENCE_CONFIG)
    expected = run(program, x).quantized_output    # against onnxruntime: test_end_to_end
    assert y.dtype == np.int8 and np.array_equal(y.reshape(len(x), -1), expected)
    capsys.readouterr()


# -- PyTorch ------------------------------------------------------------------------------

TORCH_MODELS = [pytest.param(f"{net}_{exporter}", id=f"{net}_{exporter}",
                              marks=[pytest.mark.slow] if net == "resnet8" and
                              exporter == "dynamo" else [])
                for net in ("ds_cnn", "resnet8") for exporter in ("dynamo", "torchscript")]


@pytest.mark.parametrize("name", TORCH_MODELS)
def test_torch_exports_quantize_and_run(name):
    """A float model exported by torch.onnx.export: npugen's float graph equals
    onnxruntime's; quantized with npugen's calibration, the golden model's outputs agree
    with the float ones (arg-max, and within a few output steps)."""
    path = TORCH / f"{name}.onnx"
    model = load_onnx(path)
    session = reference_session(path)
    rng = np.random.default_rng(5)
    calibration = rng.normal(0, 1, (32, *model.input_shape)).astype(np.float32)
    x = rng.normal(0, 1, (8, *model.input_shape)).astype(np.float32)
    reference = session.run(None, {session.get_inputs()[0].name: x})[0]
    if not model.host_ops:
        assert np.allclose(model.forward(x), reference, atol=1e-4)
    program = compile_model(model, REFERENCE_CONFIG, calibration=calibration)
    result = run(program, x)
    if model.host_ops:      # probabilities, in steps of 1/256
        assert program.host_ops[0]["output_scale"] == 1 / 256
        steps = np.abs(result.output - reference) * 256
        assert steps.max() <= 4, steps.max()
    else:
        steps = np.abs(result.output - reference) / program.output.scale
        assert steps.max() <= 8, steps.max()
    agree = np.mean(result.output.argmax(1) == reference.argmax(1))
    assert agree >= 0.8, agree


def test_torch_exporters_agree():
    """TorchScript and dynamo exports of one network are one model to npugen."""
    for net in ("ds_cnn", "resnet8"):
        dynamo, script = (load_onnx(TORCH / f"{net}_{e}.onnx") for e in ("dynamo",
                                                                          "torchscript"))
        x = np.random.default_rng(2).normal(0, 1, (4, *dynamo.input_shape))
        assert [type(la) for la in dynamo.layers] == [type(la) for la in script.layers]
        assert np.allclose(dynamo.forward(x), script.forward(x), atol=1e-5)


# -- errors ---------------------------------------------------------------------------------

def _graph(nodes, input_shape, output, output_shape, inits=(), input_type=TensorProto.FLOAT):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", input_type, ["n", *input_shape])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["n", *output_shape])],
        list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _conv(name, source, out, channels=4):
    weight = numpy_helper.from_array(np.ones((channels, channels, 1, 1), np.float32),
                                     f"{name}_w")
    return helper.make_node("Conv", [source, f"{name}_w"], [out], name=name), weight


def test_unsupported_node_is_named_with_its_op_type():
    conv, weight = _conv("c", "x", "y")
    node = helper.make_node("LeakyRelu", ["y"], ["z"], name="leaky")
    with pytest.raises(ModelError, match=r"1 unsupported node\(s\): node 'leaky' "
                                         r"\(LeakyRelu\)"):
        load_onnx(_graph([conv, node], (4, 5, 5), "z", (4, 5, 5), [weight]))


def test_transpose_inside_the_model_is_refused():
    conv, weight = _conv("c", "x", "y")
    turn = helper.make_node("Transpose", ["y"], ["t"], name="turn", perm=[0, 2, 3, 1])
    conv2, weight2 = _conv("c2", "t", "z")
    with pytest.raises(ModelError, match=r"node 'turn' \(Transpose\): changes the order of "
                                         r"'c' from CHW to HWC inside the model; npugen takes "
                                         r"a layout change only on the model's input or as "
                                         r"its last operator"):
        load_onnx(_graph([conv, turn, conv2], (4, 5, 5), "z", (4, 5, 5), [weight, weight2]))
    odd = helper.make_node("Transpose", ["y"], ["t"], name="swap", perm=[0, 1, 3, 2])
    with pytest.raises(ModelError, match=r"node 'swap' \(Transpose\): transposes the output "
                                         r"of 'c' \(shape \(4, 5, 5\)\) with perm \[0, 1, 3, "
                                         r"2\]; npugen takes a Transpose only as a layout "
                                         r"change at the model's edges"):
        load_onnx(_graph([conv, odd], (4, 5, 5), "t", (4, 5, 5), [weight]))
    wrong = helper.make_node("Transpose", ["x"], ["t"], name="wrong", perm=[0, 2, 3, 1])
    conv3, weight3 = _conv("c3", "t", "z", channels=5)
    with pytest.raises(ModelError, match=r"node 'wrong' \(Transpose\): transposes the "
                                         r"model's input"):
        load_onnx(_graph([wrong, conv3], (4, 5, 5), "z", (5, 5, 4), [weight3]))


def test_an_input_read_in_two_orders_is_refused():
    into = helper.make_node("Transpose", ["x"], ["t"], name="in", perm=[0, 3, 1, 2])
    conv, weight = _conv("c", "t", "y")
    add = helper.make_node("Add", ["y", "x"], ["z"], name="sum")
    with pytest.raises(ModelError, match=r"node 'in' \(Transpose\): the model's input is read "
                                         r"both through this layout change and as it is "
                                         r"\(by 'sum'\)"):
        load_onnx(_graph([into, conv, add], (4, 4, 4), "z", (4, 4, 4), [weight]))


def test_layout_transposes_at_both_edges():
    """NHWC in, NHWC out: the host turns the maps; the values are the NCHW model's."""
    into = helper.make_node("Transpose", ["x"], ["t"], name="in", perm=[0, 3, 1, 2])
    conv, weight = _conv("c", "t", "y")
    out = helper.make_node("Transpose", ["y"], ["z"], name="out", perm=[0, 2, 3, 1])
    path_model = _graph([into, conv, out], (5, 6, 4), "z", (5, 6, 4), [weight])
    model = load_onnx(path_model)
    assert (model.input_shape, model.input_layout, model.output_layout) == \
        ((4, 5, 6), "hwc", "hwc")
    x = np.random.default_rng(0).normal(0, 1, (3, 5, 6, 4)).astype(np.float32)
    # Calibration data, like the inputs to run, are in the graph's own NHWC.
    program = compile_model(model, REFERENCE_CONFIG, calibration=x)
    with pytest.raises(ValueError, match=r"calibration data must have shape \(batch, 5, 6, "
                       r"4\) \(N×H×W×C, as the model takes its input\)"):
        compile_model(model, REFERENCE_CONFIG, calibration=np.moveaxis(x, -1, 1))
    result = run(program, x)
    assert result.output.shape == (3, 5, 6, 4)
    expected = x.sum(-1, keepdims=True).repeat(4, -1)
    assert np.abs(result.output - expected).max() <= 2 * program.output.scale


def test_softmax_must_be_last():
    conv, weight = _conv("c", "x", "y")
    flat = helper.make_node("Flatten", ["y"], ["f"], name="flat")
    soft = helper.make_node("Softmax", ["f"], ["s"], name="soft")
    gemm_w = numpy_helper.from_array(np.ones((4, 4), np.float32), "g_w")
    gemm = helper.make_node("Gemm", ["s", "g_w"], ["z"], name="after")
    with pytest.raises(ModelError, match=r"node 'after' \(Gemm\) follows the Softmax"):
        load_onnx(_graph([conv, flat, soft, gemm], (4, 1, 1), "z", (4,), [weight, gemm_w]))


def test_reshape_that_moves_values_is_refused():
    conv, weight = _conv("c", "x", "y")
    shape = numpy_helper.from_array(np.array([-1, 4, 2, 8], np.int64), "shape")
    node = helper.make_node("Reshape", ["y", "shape"], ["z"], name="fold")
    with pytest.raises(ModelError, match=r"node 'fold' \(Reshape\): reshapes \(4, 4, 4\) "
                                         r"to \(4, 2, 8\)"):
        load_onnx(_graph([conv, node], (4, 4, 4), "z", (4, 2, 8), [weight, shape]))


def test_calibration_in_the_wrong_layout_exits_2(tmp_path, capsys):
    """`npugen compile` of an NHWC model with channel-first calibration data: exit 2 and
    the shape expected, no program written."""
    from npugen.cli import main

    into = helper.make_node("Transpose", ["x"], ["t"], name="in", perm=[0, 3, 1, 2])
    conv, weight = _conv("c", "t", "y")
    onnx.save(_graph([into, conv], (5, 6, 4), "y", (4, 5, 6), [weight]),
              str(tmp_path / "m.onnx"))
    np.save(tmp_path / "calib.npy", np.zeros((3, 4, 5, 6), np.float32))
    status = main(["compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npy"),
                   "-o", str(tmp_path / "m.npu")])
    err = capsys.readouterr().err
    assert status == 2 and "calibration data must have shape (batch, 5, 6, 4)" in err, err
    assert not (tmp_path / "m.npu").exists()


# -- graph passes (sw/passes.py) ------------------------------------------------------------

def test_batch_norms_and_activations_fold_into_the_layers_before():
    """Conv → BatchNormalization → Relu and Gemm → BatchNormalization → Clip: two layers,
    whose float outputs are onnxruntime's."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
             for name, shape in (("cw", (4, 3, 3, 3)), ("gw", (36, 5)), ("gb", (5,)))]
    for prefix, channels in (("c", 4), ("g", 5)):
        inits += [numpy_helper.from_array(values.astype(np.float32), f"{prefix}_{what}")
                  for what, values in (("scale", rng.uniform(0.5, 2, channels)),
                                       ("bias", rng.normal(0, 1, channels)),
                                       ("mean", rng.normal(0, 1, channels)),
                                       ("var", rng.uniform(0.5, 2, channels)))]
    six = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0), ("hi", 6))]
    norm = ["scale", "bias", "mean", "var"]
    nodes = [helper.make_node("Conv", ["input", "cw"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", *(f"c_{n}" for n in norm)], ["cn"],
                              name="conv_bn"),
             helper.make_node("Relu", ["cn"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], name="dense"),
             helper.make_node("BatchNormalization", ["g", *(f"g_{n}" for n in norm)], ["gn"],
                              name="dense_bn"),
             helper.make_node("Clip", ["gn", "lo", "hi"], ["y"], name="relu6")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], inits + six)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = load_onnx(proto)
    assert [layer.name for layer in model.layers] == ["conv", "dense"]
    assert (model.layers[0].low, model.layers[1].low, model.layers[1].high) == (0, 0, 6)
    x = rng.normal(0, 1, (4, 3, 5, 5)).astype(np.float32)
    expected = _session(proto, Path("bn.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(model.forward(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("node, message", [
    (helper.make_node("Relu", ["x"], ["z"], name="first"),
     r"node 'first' \(Relu\): an activation must follow .*its input is the model's input"),
    (helper.make_node("BatchNormalization", ["p", "s", "s", "s", "s"], ["z"], name="bn"),
     r"node 'bn' \(BatchNormalization\): a BatchNormalization must directly follow a float "
     r"Conv, Gemm or MatMul .*its input is 'pool'"),
])
def test_what_cannot_be_folded_is_named(node, message):
    conv, weight = _conv("c", "x", "y")
    pool = helper.make_node("MaxPool", ["y"], ["p"], name="pool", kernel_shape=[1, 1])
    ones = numpy_helper.from_array(np.ones(4, np.float32), "s")
    with pytest.raises(ModelError, match=message):
        load_onnx(_graph([conv, pool, node], (4, 5, 5), "z", (4, 5, 5), [weight, ones]))


def test_two_strides_and_non_square_pools_match_onnxruntime(tmp_path):
    """A Conv with strides (2, 1) and a 2×3 max pooling with strides (2, 3), quantized by
    onnxruntime: bit-exact. (An average pooling's float32 sum in onnxruntime lands on
    either side of a rounding half, tests/test_onnx_converters.py's layer checks.)"""
    from conftest import quantize_with_onnxruntime, steps_from_onnxruntime

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32),
                                     "cw"),
             numpy_helper.from_array(rng.normal(0, 0.3, (6,)).astype(np.float32), "cb")]
    nodes = [helper.make_node("Conv", ["input", "cw", "cb"], ["c"], name="conv",
                              strides=[2, 1], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["y"], name="pool", kernel_shape=[2, 3],
                              strides=[2, 3])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6, 3, 4])], inits)
    float_path, qdq_path = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              float_path)
    x = rng.normal(0, 1, (40, 3, 12, 12)).astype(np.float32)
    quantize_with_onnxruntime(float_path, qdq_path, x[:20], per_channel=True)
    model = load_onnx(qdq_path)
    assert [(layer.name, layer.stride) for layer in model.layers] == [("conv", (2, 1)),
                                                                      ("pool", (2, 3))]
    program = compile_model(model, REFERENCE_CONFIG)
    assert steps_from_onnxruntime(program, qdq_path, x).max() == 0


@pytest.mark.parametrize("kernel, strides", [((2, 2), (2, 2)), ((2, 3), (1, 1))])
def test_average_pooling_rounds_halves_to_even_as_onnx_defines(tmp_path, kernel, strides):
    """An AveragePool between QDQ nodes of one scale: its windows of 4 and 6 values give a
    mean exactly halfway between two steps for a quarter and a sixth of the outputs. npugen
    gives round-half-to-even of the exact mean (ONNX's QuantizeLinear) on every output;
    onnxruntime's float32 mean differs from it only at those halves, where its rounding
    error decides."""
    scale, zero = 0.05, -3
    quant = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(zero, np.int8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"], name="quantize"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dequantize"),
             helper.make_node("AveragePool", ["d"], ["p"], name="pool",
                              kernel_shape=list(kernel), strides=list(strides)),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["pq"], name="quantize_out"),
             helper.make_node("DequantizeLinear", ["pq", "s", "z"], ["y"], name="output")]
    out_h, out_w = ((12 - kernel[0]) // strides[0] + 1, (12 - kernel[1]) // strides[1] + 1)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, out_h, out_w])], quant)
    path = tmp_path / "pool.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = np.random.default_rng(7).normal(0, 1, (24, 3, 12, 12)).astype(np.float32)
    program = compile_model(load_onnx(path), REFERENCE_CONFIG)
    ours = run(program, x).quantized_output.reshape(len(x), -1).astype(np.int64)
    # The definition, exactly: the input quantized (as QuantizeLinear: float32 division,
    # half to even), the mean of each window, rounded half to even.
    q = np.clip(np.round(x / np.float32(scale)) + zero, -128, 127).astype(np.int64) - zero
    windows = np.lib.stride_tricks.sliding_window_view(q, kernel, axis=(2, 3))
    sums = windows[:, :, ::strides[0], ::strides[1]].sum(axis=(-2, -1)).reshape(len(x), -1)
    count = kernel[0] * kernel[1]
    halves = (2 * sums) % (2 * count) == count
    assert halves.mean() > 0.15
    np.testing.assert_array_equal(ours, np.round(sums / count).astype(np.int64) + zero)
    theirs = np.round(reference_session(path).run(None, {"input": x})[0] / np.float32(scale))
    theirs = theirs.astype(np.int64).reshape(len(x), -1) + zero
    assert not np.any((ours != theirs) & ~halves)


def _requantizing_relu(after: tuple[float, int], middle: str = "Relu") -> onnx.ModelProto:
    """input → QDQ → Conv → QDQ (scale 0.05, zero point 3) → Relu → QDQ ``after``: a Relu
    that onnxruntime runs between two quantizations (or a Flatten: ``middle``)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(v, dtype), n) for n, v, dtype in (
        ("si", 0.02, np.float32), ("z0", 0, np.int8), ("sw", 0.002, np.float32),
        ("s1", 0.05, np.float32), ("z1", 3, np.int8),
        ("s2", after[0], np.float32), ("z2", after[1], np.int8))]
    inits += [numpy_helper.from_array(rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8),
                                      "wq"),
              numpy_helper.from_array(rng.integers(-3000, 3000, 4).astype(np.int32), "bq"),
              numpy_helper.from_array(np.array(0.02 * 0.002, np.float32), "sb"),
              numpy_helper.from_array(np.array(0, np.int32), "zb")]
    def qdq(source, scale, zero, out):
        return [helper.make_node("QuantizeLinear", [source, scale, zero], [f"{out}_q"],
                                 name=f"{out}_quantize"),
                helper.make_node("DequantizeLinear", [f"{out}_q", scale, zero], [out],
                                 name=f"{out}_dequantize")]

    nodes = [*qdq("input", "si", "z0", "d"),
             helper.make_node("DequantizeLinear", ["wq", "sw", "z0"], ["w"], name="weights"),
             helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["b"], name="bias"),
             helper.make_node("Conv", ["d", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             *qdq("c", "s1", "z1", "cd"),
             helper.make_node(middle, ["cd"], ["r"], name=middle.lower()),
             *qdq("r", "s2", "z2", "y")]
    shape = [4, 8, 8] if middle == "Relu" else [256]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", *shape])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_activation_between_two_quantizations_is_refused(tmp_path, capsys):
    """A Relu whose QDQ output has the Conv's quantization folds into it, bit-exact with
    onnxruntime; one between two quantizations (its framework rounds twice, and saturates
    at the first) is refused naming both, exit 2 on the command line, where it had been
    folded with the second alone: 10 % of the outputs a step off, exit 0."""
    from npugen.cli import main

    path = tmp_path / "same.onnx"
    onnx.save(_requantizing_relu((0.05, 3)), path)
    x = np.random.default_rng(1).normal(0, 1, (8, 3, 8, 8)).astype(np.float32)
    model = load_onnx(path)
    ours = run(compile_model(model, REFERENCE_CONFIG), x).quantized_output.reshape(len(x), -1)
    q = np.clip(np.round(x / np.float32(0.02)), -128, 127)
    exact, bound = exact_values(model.layers[0], q, 0, np.full(4, 0.02 * 0.002 / 0.05))
    np.testing.assert_array_equal(ours, np.clip(np.round(exact) + 3, 3, 127))
    theirs = np.round(reference_session(path).run(None, {"input": x})[0] / np.float32(0.05)) + 3
    off = ours != theirs.reshape(len(x), -1)   # onnxruntime's float32 sum near a half only
    assert np.all(np.abs(exact[off] % 1 - 0.5) <= bound[off])
    for after in ((0.07, 3), (0.05, -128)):
        path = tmp_path / "requantizing.onnx"
        onnx.save(_requantizing_relu(after), path)
        message = (rf"node 'relu' \(Relu\): its output is quantized with scale {after[0]:g} and "
                   rf"zero point {after[1]}, its input 'conv' with scale 0.05 and zero point 3")
        with pytest.raises(ModelError, match=message):
            load_onnx(path)
        assert main(["compile", str(path), "-o", str(tmp_path / "m.npu")]) == 2
        assert "quantize both sides of it alike" in capsys.readouterr().err
        assert not (tmp_path / "m.npu").exists()


def test_a_map_quantized_twice_is_refused():
    """Conv → QDQ → Flatten → QDQ of another scale: onnxruntime rounds at both, so the
    second QuantizeLinear is refused by name (it had replaced the first: 19 % of the
    outputs a step off, exit 0); of the same scale it is the Conv's output."""
    with pytest.raises(ModelError, match=r"node 'y_quantize' \(QuantizeLinear\): quantizes "
                                         r"the output of 'conv' again, with scale 0.07"):
        load_onnx(_requantizing_relu((0.07, 3), middle="Flatten"))
    model = load_onnx(_requantizing_relu((0.05, 3), middle="Flatten"))
    assert [layer.name for layer in model.layers] == ["conv"]


def _dense_model(path: Path, *, fused: bool) -> Path:
    """MatMul → Add (bias) → Relu → MatMul, quantized by onnxruntime's quantize_static;
    ``fused``: after its quant_pre_process, which makes the MatMul and Add a Gemm."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from conftest import quantize_with_onnxruntime

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (32, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 1, (16,)).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.3, (16, 8)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["input", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["a"], name="bias"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], inits)
    float_path = path.with_suffix(".float.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), float_path)
    if fused:
        quant_pre_process(str(float_path), str(float_path), skip_symbolic_shape=True)
    quantize_with_onnxruntime(float_path, path, rng.normal(0, 1, (50, 32)).astype(np.float32),
                              per_channel=False)
    return path


def test_a_bias_added_after_quantization_is_refused(tmp_path, capsys):
    """quantize_static quantizes a MatMul's output before the Add of its bias: the model
    rounds twice, and the Add's int8 constant has a scale and zero point of its own.
    npugen had taken its raw values as the accumulator's bias (97 % of the outputs off, up
    to 58 steps, exit 0); it refuses the model, naming the Add. After quant_pre_process
    (MatMul and Add as one Gemm) the model is bit-exact with onnxruntime."""
    from npugen.cli import main

    path = _dense_model(tmp_path / "twice.onnx", fused=False)
    with pytest.raises(ModelError, match=r"node 'bias' \(Add\): adds a bias to the output "
                                         r"of 'mm' after it is quantized"):
        load_onnx(path)
    assert main(["compile", str(path), "-o", str(tmp_path / "m.npu")]) == 2
    assert "quant_pre_process" in capsys.readouterr().err
    assert not (tmp_path / "m.npu").exists()

    path = _dense_model(tmp_path / "fused.onnx", fused=True)
    x = np.random.default_rng(1).normal(0, 1, (100, 32)).astype(np.float32)
    ours = run(compile_model(load_onnx(path), REFERENCE_CONFIG), x).quantized_output
    proto = onnx.load(path)
    last = [node for node in proto.graph.node if node.op_type == "QuantizeLinear"][-1]
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    scale, zero = inits[last.input[1]], int(inits[last.input[2]])
    theirs = np.round(reference_session(path).run(None, {"input": x})[0] / scale) + zero
    np.testing.assert_array_equal(ours.reshape(theirs.shape), theirs)


@pytest.mark.parametrize("bias, scale, zero, expected", [
    (np.array([3, -5], np.int32), 2 * 0.02 * 0.01, 0, [6, -10]),   # whole steps: taken
    (np.array([3, -5], np.int8), 5 * 0.02 * 0.01, 0, [15, -25]),   # int8, coarser
    (np.array([3, -5], np.int8), 0.001 / 3, 0, None),              # between steps
    (np.array([70000, -5], np.int32), 3 * 0.02 * 0.01, 0, [210000, -15]),
    (np.array([3, -5], np.int32), 0.02 * 0.01, 1, [2, -6]),        # a zero point
    (np.array([3, -5], np.int32), 1.5 * 0.02 * 0.01, 0, None),
])
def test_a_quantized_bias_must_be_whole_accumulator_steps(bias, scale, zero, expected):
    """A QDQ Gemm's bias is added in the accumulator, in steps of input scale × weight
    scale: a bias whose scale is a whole number of steps is converted (its zero point
    subtracted), any other refused."""
    inits = [numpy_helper.from_array(np.array(v, t), n) for n, v, t in (
        ("s", 0.02, np.float32), ("z", 0, np.int8), ("sw", 0.01, np.float32),
        ("sb", scale, np.float32), ("zb", zero, bias.dtype))]
    inits += [numpy_helper.from_array(np.ones((2, 4), np.int8), "wq"),
              numpy_helper.from_array(bias, "bq")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="d"),
             helper.make_node("DequantizeLinear", ["wq", "sw", "z"], ["w"], name="dw"),
             helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["b"], name="db"),
             helper.make_node("Gemm", ["xd", "w", "b"], ["y"], name="dense", transB=1)]
    model = _graph(nodes, (4,), "y", (2,), inits)
    if expected is None:
        with pytest.raises(ModelError, match=r"node 'dense' \(Gemm\): its bias is quantized "
                                             r"with scale .* not a whole number"):
            load_onnx(model)
    else:
        assert load_onnx(model).layers[0].quantized_bias.tolist() == expected


def test_a_whole_map_average_pooling_is_a_global_one():
    conv, weight = _conv("c", "x", "y")
    whole = helper.make_node("AveragePool", ["y"], ["z"], name="whole", kernel_shape=[5, 3],
                             strides=[2, 1])
    model = load_onnx(_graph([conv, whole], (4, 5, 3), "z", (4, 1, 1), [weight]))
    assert (model.layers[1].kind, model.layers[1].window) == ("global", (1, 1))
