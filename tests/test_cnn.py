"""Convolutional networks end to end: ONNX import (float, QDQ, PyTorch), BatchNorm folding,
quantization, compilation to feature maps, runs on the golden model and the RTL."""

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import (
    available_simulators,
    quantize_with_onnxruntime,
    reference_session,
    steps_from_onnxruntime,
)
from npugen import NpuConfig
from npugen.cli import main
from npugen.compiler import compile_model
from npugen.featuremap import same_pads
from npugen.graph import Add, Dense, Model, ModelError
from npugen.importers import load_onnx
from npugen.runtime import run
from npugen.schedule import DoesNotFit
from npugen.train import cnn_to_onnx, digits, train_cnn

SMALL = NpuConfig(rows=4, cols=4, activation_depth=2048, weight_depth=4096,
                  accumulator_depth=256, instruction_depth=1024, param_depth=128,
                  requant_lanes=2)


@pytest.fixture(scope="module")
def data():
    x_train, x_test, y_train, y_test = digits()
    return x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8), y_train, y_test


@pytest.fixture(scope="module")
def cnn_path(data, tmp_path_factory):
    x_train, _, y_train, _ = data
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    cnn_to_onnx(train_cnn(x_train.reshape(len(x_train), -1), y_train, epochs=10), path)
    return path


def test_cnn_int8_accuracy_within_one_point_of_float(data, cnn_path):
    x_train, x_test, _, y_test = data
    model = load_onnx(cnn_path)
    program = compile_model(model, NpuConfig(), calibration=x_train[:256])
    float_accuracy = np.mean(model.forward(x_test).argmax(1) == y_test)
    int8_accuracy = np.mean(run(program, x_test).output.argmax(1) == y_test)
    assert float_accuracy > 0.95
    assert abs(float_accuracy - int8_accuracy) <= 0.01, (float_accuracy, int8_accuracy)
    kinds = [layer["kind"] for layer in program.layers]
    assert kinds == ["conv (im2col input)", "conv", "maxpool", "dense"]
    assert sum(layer["cycles"] for layer in program.layers) == program.estimated_cycles


@pytest.mark.parametrize("rounding", ["both", "single"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_cnn_matches_onnxruntime(tmp_path, data, cnn_path, per_channel, rounding):
    """onnxruntime, running each QDQ node as defined (reference_session), requantizes in
    float, rounding once: so does npugen for an ONNX model (REQUANT single_rounding), and
    it agrees on every element. An NPU generated with TFLite's double rounding only
    refuses the model, naming a layer."""
    x_train, x_test, _, _ = data
    qdq_path = tmp_path / "q.onnx"
    quantize_with_onnxruntime(cnn_path, qdq_path, x_train[:200], per_channel=per_channel)
    program = compile_model(load_onnx(qdq_path), NpuConfig(rounding=rounding))
    assert steps_from_onnxruntime(program, qdq_path, x_test).max() == 0
    with pytest.raises(DoesNotFit, match="requantizes with single rounding .* rounding = "
                                         "'double' only"):
        compile_model(load_onnx(qdq_path), NpuConfig(rounding="double"))


def _initializer(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def _classifier(nodes, inits, name: str, shape: tuple[int, ...]) -> onnx.ModelProto:
    """A checked graph from ``input`` (batch, *shape) to 4 ``logits``."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def mixed_cnn(rng) -> onnx.ModelProto:
    """Every supported map operator, built with onnx.helper: a SAME_UPPER stride-2 conv
    with BatchNormalization, a depthwise 3×3 conv, a padded average pool
    (count_include_pad), a VALID 1×1 conv, max pooling with padding, global average
    pooling, Flatten and Gemm."""
    c0, c1, c2 = 6, 6, 5
    values = {
        "w0": rng.normal(0, 0.4, (c0, 3, 3, 3)), "b0": rng.normal(0, 0.1, c0),
        "bn_scale": rng.uniform(0.5, 1.5, c0), "bn_bias": rng.normal(0, 0.1, c0),
        "bn_mean": rng.normal(0, 0.1, c0), "bn_var": rng.uniform(0.5, 2, c0),
        "w1": rng.normal(0, 0.4, (c1, 1, 3, 3)), "b1": rng.normal(0, 0.1, c1),
        "w2": rng.normal(0, 0.4, (c2, c1, 1, 1)), "b2": rng.normal(0, 0.1, c2),
        "fc_w": rng.normal(0, 0.4, (4, c2)), "fc_b": rng.normal(0, 0.1, 4),
    }
    inits = [_initializer(name, value) for name, value in values.items()]
    nodes = [
        helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], name="conv0", strides=[2, 2],
                         auto_pad="SAME_UPPER", kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c0", "bn_scale", "bn_bias", "bn_mean",
                                                "bn_var"], ["n0"], name="bn0", epsilon=1e-3),
        helper.make_node("Relu", ["n0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="dw1", group=c1,
                         pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("AveragePool", ["r1"], ["p1"], name="avg1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], count_include_pad=1),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="pw2", auto_pad="VALID"),
        helper.make_node("MaxPool", ["c2"], ["p2"], name="max2", kernel_shape=[2, 2],
                         pads=[0, 0, 1, 1], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _classifier(nodes, inits, "mixed", (3, 9, 11))


def check_against_onnxruntime_and_rtl(tmp_path, proto, x, simulator):
    """The imported model computes what onnxruntime does in float; compiled, its RTL run
    equals the golden model on three inputs. Returns the program, the golden run and
    onnxruntime's outputs."""
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    model = load_onnx(path)
    reference = reference_session(path).run(None, {"input": x})[0]
    np.testing.assert_allclose(model.forward(x), reference, atol=1e-4)
    program = compile_model(model, SMALL, calibration=x)
    golden = run(program, x[:3])
    rtl = run(program, x[:3], target="rtl", simulator=simulator)
    assert np.array_equal(rtl.quantized_output, golden.quantized_output)
    assert rtl.counters == golden.counters
    return program, golden, reference


@pytest.mark.parametrize("simulator", available_simulators())
def test_every_operator_imports_like_onnxruntime_and_runs_bit_exact(tmp_path, simulator):
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (24, 3, 9, 11)).astype(np.float32)
    program, golden, reference = check_against_onnxruntime_and_rtl(
        tmp_path, mixed_cnn(rng), x, simulator)
    assert [layer["kind"] for layer in program.layers] == [
        "conv (im2col input)", "depthwise", "avgpool", "conv", "maxpool", "globalavgpool",
        "dense"]
    # int8 follows float within a few output steps.
    assert np.abs(golden.output - reference[:3]).max() <= 4 * program.output.scale + 0.05


def test_pytorch_cnn_export(tmp_path, data):
    torch = pytest.importorskip("torch")
    x_train = data[0]
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 6, 3, padding=1, groups=6), torch.nn.ReLU6(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(6, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 10)).eval()
    with torch.no_grad():   # non-trivial BatchNorm statistics to fold
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    path = tmp_path / "torch_cnn.onnx"
    torch.onnx.export(net, torch.zeros(1, 1, 8, 8), str(path), input_names=["input"],
                      output_names=["y"], dynamic_axes={"input": {0: "b"}, "y": {0: "b"}},
                      opset_version=17, dynamo=False)
    model = load_onnx(path)
    with torch.no_grad():
        expected = net(torch.from_numpy(x_train[:32])).numpy()
    np.testing.assert_allclose(model.forward(x_train[:32]), expected, atol=1e-4)
    program = compile_model(model, NpuConfig(), calibration=x_train[:128])
    out = run(program, x_train[:32]).output
    assert np.abs(out - expected).max() < 0.1 * np.abs(expected).max()


def _conv_graph(**attributes) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["input", "w"], ["y"], name="badconv", **attributes)]
    channels = 4
    groups = attributes.get("group", 1)
    inits = [_initializer("w", np.ones((4, channels // groups, 3, 3)))]
    graph = helper.make_graph(
        nodes, "bad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("attributes, message", [
    ({"group": 2}, "node 'badconv' (Conv): group=2 is not supported"),
    ({"dilations": [2, 2]}, "node 'badconv' (Conv): dilations other than 1"),
    ({"strides": [1, 300]}, "node 'badconv' (Conv): strides [1, 300] are not supported "
                            "(two, 1 to 255)"),
])
def test_unsupported_conv_attributes_are_named(attributes, message):
    with pytest.raises(ModelError, match=re.escape(message)):
        load_onnx(_conv_graph(**attributes))


def _single_node_graph(node, shape=(2, 6, 6), inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "one",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", *shape])],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_same_padding_puts_the_odd_pixel_after_or_before():
    """5 rows, a 4-row kernel, stride 2: 3 outputs need 3 rows of padding, the odd one
    after (TFLite, ONNX's SAME_UPPER) or before (SAME_LOWER); 6 columns, 3 wide, stride 1:
    2, one each side."""
    assert same_pads((5, 6), (4, 3), (2, 1)) == (1, 1, 2, 1)
    assert same_pads((5, 6), (4, 3), (2, 1), odd_after=False) == (2, 1, 1, 1)


def test_padded_average_pool_without_count_include_pad_is_refused():
    node = helper.make_node("AveragePool", ["input"], ["y"], name="avg", kernel_shape=[3, 3],
                            pads=[1, 1, 1, 1])
    with pytest.raises(ModelError, match="node 'avg' .AveragePool.: padded average pooling "
                                         "needs count_include_pad=1"):
        load_onnx(_single_node_graph(node))


def test_batch_norm_must_follow_a_conv():
    inits = [_initializer(n, np.ones(2)) for n in ("s", "b", "m", "v")]
    node = helper.make_node("BatchNormalization", ["input", "s", "b", "m", "v"], ["y"],
                            name="bn")
    with pytest.raises(ModelError, match="node 'bn' .BatchNormalization.: a "
                                         "BatchNormalization must directly follow a float "
                                         "Conv, Gemm or MatMul .*its input is the model's "
                                         "input"):
        load_onnx(_single_node_graph(node, inits=inits))


def test_pooling_needs_a_feature_map():
    node = helper.make_node("MaxPool", ["input"], ["y"], name="pool", kernel_shape=[2, 2])
    with pytest.raises(ModelError, match="node 'pool' .MaxPool.: needs a C×H×W feature map"):
        load_onnx(_single_node_graph(node, shape=(12,)))


def test_cnn_that_does_not_fit_names_the_memory(cnn_path, data):
    tiny = NpuConfig(rows=4, cols=4, activation_depth=128, weight_depth=4096,
                     accumulator_depth=256, instruction_depth=1024, param_depth=128)
    with pytest.raises(ValueError, match="feature maps need .* activation words, "
                                         "activation_depth is 128"):
        compile_model(load_onnx(cnn_path), tiny, calibration=data[0][:32])


def test_cli_compiles_and_runs_a_cnn(tmp_path, cnn_path, data, capsys):
    x_train, x_test, _, _ = data
    np.save(tmp_path / "calib.npy", x_train[:64])
    np.save(tmp_path / "x.npy", x_test[:5])
    program = tmp_path / "cnn.npu"
    assert main(["compile", str(cnn_path), "--calib", str(tmp_path / "calib.npy"),
                 "-o", str(program), "--json"]) == 0
    compiled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert compiled["batch"] == 1
    assert main(["run", str(program), "--input", str(tmp_path / "x.npy"),
                 "-o", str(tmp_path / "y.npy"), "--target", "golden", "--json"]) == 0
    ran = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ran["inferences"] == 5
    assert np.load(tmp_path / "y.npy").shape == (5, 10)
    assert main(["compile", str(cnn_path), "--calib", str(tmp_path / "calib.npy"),
                 "-o", str(program), "--batch", "4"]) == 2
    assert "one image a run" in capsys.readouterr().err


def test_cli_refuses_an_empty_calibration_file(tmp_path, cnn_path, capsys):
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    assert main(["compile", str(cnn_path), "--calib", str(empty), "-o",
                 str(tmp_path / "x.npu")]) == 2
    assert "calibration file" in capsys.readouterr().err


def residual_cnn(rng, *, relu_before_add: bool = True) -> onnx.ModelProto:
    """input → conv3×3 → ReLU → conv3×3 → Add(first ReLU's output) → ReLU → Add(the model's
    input, via a 1×1 conv to its channels) → global average pool → Gemm."""
    c = 5
    values = {
        "w0": rng.normal(0, 0.4, (c, 3, 3, 3)), "b0": rng.normal(0, 0.1, c),
        "w1": rng.normal(0, 0.3, (c, c, 3, 3)), "b1": rng.normal(0, 0.1, c),
        "w2": rng.normal(0, 0.4, (3, c, 1, 1)), "b2": rng.normal(0, 0.1, 3),
        "fc_w": rng.normal(0, 0.4, (4, 3)), "fc_b": rng.normal(0, 0.1, 4),
    }
    inits = [_initializer(name, value) for name, value in values.items()]
    skip = "r0" if relu_before_add else "c0"
    nodes = [
        helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", [skip, "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", [skip, "c1"], ["s1"], name="residual1"),
        helper.make_node("Relu", ["s1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="project2"),
        helper.make_node("Add", ["c2", "input"], ["s2"], name="residual2"),
        helper.make_node("GlobalAveragePool", ["s2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _classifier(nodes, inits, "residual", (3, 7, 6))


@pytest.mark.parametrize("simulator", available_simulators())
def test_residual_adds_run_on_chip_bit_exact(tmp_path, simulator):
    rng = np.random.default_rng(8)
    proto = residual_cnn(rng)
    x = rng.uniform(-1, 1, (32, 3, 7, 6)).astype(np.float32)
    program, _, reference = check_against_onnxruntime_and_rtl(tmp_path, proto, x, simulator)
    kinds = [layer["kind"] for layer in program.layers]
    assert kinds == ["conv", "conv", "add", "conv", "add", "globalavgpool", "dense"]
    assert program.layers[4]["inputs"] == ["project2", "input"]
    assert np.abs(run(program, x).output - reference).max() <= 6 * program.output.scale


@pytest.mark.parametrize("config", [
    NpuConfig(rounding="single"),
    # The adds' inputs looked up in tables (rounded once, as ONNX's QDQ Add).
    NpuConfig(rounding="single", requant_overlap=True, rescale_tables=True)],
    ids=["8x8", "8x8-rescale-tables"])
def test_qdq_residual_matches_onnxruntime(tmp_path, config):
    rng = np.random.default_rng(9)
    float_path, qdq_path = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(residual_cnn(rng), str(float_path))
    x = rng.uniform(-1, 1, (300, 3, 7, 6)).astype(np.float32)
    quantize_with_onnxruntime(float_path, qdq_path, x[:100], per_channel=True)
    program = compile_model(load_onnx(qdq_path), config)
    assert "add" in [layer["kind"] for layer in program.layers]
    assert steps_from_onnxruntime(program, qdq_path, x[100:]).max() == 0


def test_a_tensor_read_before_its_fused_activation_is_refused():
    """conv1 and the Add read conv0's output before ReLU, but ReLU is folded into conv0."""
    with pytest.raises(ModelError, match="node 'relu0' .Relu.: its input 'conv0' is also "
                                         "read by 'conv1'"):
        load_onnx(residual_cnn(np.random.default_rng(1), relu_before_add=False))


@pytest.mark.slow  # a virtual board on Verilator
def test_cnn_runs_on_the_virtual_board(cnn_path, data):
    """Through the UART link and the driver, as on a board: equal to the golden model."""
    x_train, x_test, _, _ = data
    program = compile_model(load_onnx(cnn_path), NpuConfig(), calibration=x_train[:256])
    golden = run(program, x_test[:3])
    board = run(program, x_test[:3], target="sim")
    assert np.array_equal(board.quantized_output, golden.quantized_output)
    assert board.counters == golden.counters


def test_a_cnn_needs_an_npu_with_feature_maps(cnn_path, data):
    with pytest.raises(ValueError, match="its input is a 1×8×8 feature map.*generated "
                                         "without them .feature_maps = false."):
        compile_model(load_onnx(cnn_path), NpuConfig(feature_maps=False),
                      calibration=data[0][:32])


def test_a_dense_skip_connection_is_named_on_an_npu_without_feature_maps():
    """Dense layers with an Add are no MLP chain: the refusal names the layer that is not."""
    rng = np.random.default_rng(3)
    model = Model([Dense("d0", rng.normal(0, 0.3, (8, 8)), np.zeros(8), inputs=("input",)),
                   Dense("d1", rng.normal(0, 0.3, (8, 8)), np.zeros(8), inputs=("d0",)),
                   Add("skip", ("d0", "d1"))], (8,), (8,))
    with pytest.raises(ValueError, match="layer 'skip' is an Add.*feature_maps = false"):
        compile_model(model, NpuConfig(feature_maps=False),
                      calibration=rng.uniform(-1, 1, (16, 8)).astype(np.float32))


def test_input_im2col_saves_cycles_and_changes_no_output(cnn_path, data):
    """The demo's first convolution has one input channel: with the input prepared by
    im2col on the host, its nine taps share two K tiles instead of taking nine."""
    from npugen.compiler import compile_quantized
    from npugen.quantize import quantize_model

    x_train, x_test, _, _ = data
    quantized = quantize_model(load_onnx(cnn_path), x_train[:256])
    packed = compile_quantized(quantized, NpuConfig())
    plain = compile_quantized(quantized, NpuConfig(), input_im2col=False)
    assert packed.input.im2col == (3, 3, 1, 1, 1, 1, 1) and plain.input.im2col is None
    assert packed.layers[0]["kind"] == "conv (im2col input)"
    assert packed.layers[0]["cycles"] < plain.layers[0]["cycles"] / 2
    assert np.array_equal(run(packed, x_test).quantized_output,
                          run(plain, x_test).quantized_output)
    reloaded = type(packed).from_bytes(packed.to_bytes())
    assert reloaded.input == packed.input


def random_cnn(rng) -> onnx.ModelProto:
    """A random chain of map operators (conv with random kernel, stride and padding,
    depthwise conv, pooling, residual add) on a random input, ending in GAP and Gemm."""
    channels = int(rng.integers(1, 6))
    shape = (channels, int(rng.integers(5, 10)), int(rng.integers(5, 10)))
    nodes, inits, previous, count = [], [], "input", 0

    def fresh(prefix):
        nonlocal count
        count += 1
        return f"{prefix}{count}"

    for _ in range(int(rng.integers(2, 5))):
        kind = rng.choice(["conv", "conv", "depthwise", "maxpool", "avgpool", "add"])
        out = fresh(kind)
        if kind in ("conv", "depthwise"):
            kernel = int(rng.integers(1, 4))
            stride = int(rng.choice([1, 1, 2]))
            pad = int(rng.integers(0, kernel))
            groups = channels if kind == "depthwise" else 1
            out_channels = channels if kind == "depthwise" else int(rng.integers(1, 9))
            w, b = fresh("w"), fresh("b")
            inits += [_initializer(w, rng.normal(0, 0.5, (out_channels, channels // groups,
                                                          kernel, kernel))),
                      _initializer(b, rng.normal(0, 0.1, out_channels))]
            nodes.append(helper.make_node("Conv", [previous, w, b], [out], name=out,
                                          strides=[stride, stride], pads=[pad] * 4,
                                          group=groups, kernel_shape=[kernel, kernel]))
            relu = fresh("relu")
            nodes.append(helper.make_node("Relu", [out], [relu], name=relu))
            previous, channels = relu, out_channels
        elif kind in ("maxpool", "avgpool"):
            op = "MaxPool" if kind == "maxpool" else "AveragePool"
            nodes.append(helper.make_node(op, [previous], [out], name=out, kernel_shape=[2, 2],
                                          strides=[1, 1]))
            previous = out
        else:
            w, b = fresh("w"), fresh("b")
            inits += [_initializer(w, rng.normal(0, 0.5, (channels, channels, 3, 3))),
                      _initializer(b, rng.normal(0, 0.1, channels))]
            branch = fresh("branch")
            nodes.append(helper.make_node("Conv", [previous, w, b], [branch], name=branch,
                                          pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
            nodes.append(helper.make_node("Add", [previous, branch], [out], name=out))
            previous = out
    inits += [_initializer("fc_w", rng.normal(0, 0.5, (4, channels))),
              _initializer("fc_b", rng.normal(0, 0.1, 4))]
    nodes += [helper.make_node("GlobalAveragePool", [previous], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc",
                               transB=1)]
    return _classifier(nodes, inits, "random", shape)


@pytest.mark.parametrize("seed", range(4))
def test_random_cnns_compile_and_run_bit_exact(tmp_path, seed):
    """Random operator chains: the importer agrees with onnxruntime in float, and the
    compiled program runs on the RTL exactly as on the golden model."""
    rng = np.random.default_rng(100 + seed)
    proto = random_cnn(rng)
    shape = tuple(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:])
    x = rng.uniform(-1, 1, (16, *shape)).astype(np.float32)
    check_against_onnxruntime_and_rtl(tmp_path, proto, x, "verilator")


def test_global_pooling_of_a_one_pixel_map_passes_values_through():
    """Its rescale is exactly 1, which a right shift alone cannot apply: the identity
    multiplier (2**31 − 1) does."""
    rng = np.random.default_rng(5)
    inits = [_initializer("w", rng.normal(0, 0.5, (3, 2, 3, 3))),
             _initializer("b", rng.normal(0, 0.1, 3)),
             _initializer("fc_w", rng.normal(0, 0.5, (4, 3))),
             _initializer("fc_b", rng.normal(0, 0.1, 4))]
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc",
                              transB=1)]
    model = load_onnx(_classifier(nodes, inits, "one_pixel", (2, 3, 3)))
    x = rng.uniform(-1, 1, (64, 2, 3, 3)).astype(np.float32)
    program = compile_model(model, SMALL, calibration=x)
    out = run(program, x).output
    assert np.abs(out - model.forward(x)).max() < 4 * program.output.scale


def test_cli_bad_cnn_inputs_exit_2(tmp_path, cnn_path, data, capsys):
    """Each is refused with exit 2 and a message naming the problem."""
    np.save(tmp_path / "calib.npy", data[0][:16])
    base = ["compile", str(cnn_path), "--calib", str(tmp_path / "calib.npy"),
            "-o", str(tmp_path / "x.npu")]
    bad_conv = tmp_path / "bad.onnx"
    onnx.save(_conv_graph(group=2), str(bad_conv))
    cases = [
        (base + ["--feature-maps", "false"], "generated without them"),
        (base + ["--feature-maps", "maybe"], "expected true or false, not 'maybe'"),
        (base + ["--max-pooling", "false"], "is max pooling, but this"),
        (base + ["--rounding", "triple"], "rounding must be one of 'double', 'single'"),
        (["compile", str(bad_conv), "--calib", str(tmp_path / "calib.npy"), "-o",
          str(tmp_path / "y.npu")], "node 'badconv' (Conv): group=2 is not supported"),
    ]
    for argv, message in cases:
        try:
            status = main(argv)
        except SystemExit as exit:   # argparse refuses a flag's value itself
            status = exit.code
        assert status == 2, argv
        assert message in capsys.readouterr().err, argv
