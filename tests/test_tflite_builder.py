"""Every model tests/tflite_builder.py writes loads and runs in LiteRT's reference kernels."""

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from tflite_builder import TensorRef, TfliteBuilder


def run_reference(data: bytes, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Runs a model in LiteRT with the BUILTIN_REF op resolver."""
    interpreter = Interpreter(
        model_content=data, experimental_op_resolver_type=OpResolverType.BUILTIN_REF
    )
    interpreter.allocate_tensors()
    for detail, value in zip(interpreter.get_input_details(), inputs, strict=True):
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def random_input(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-128, 128, shape).astype(np.int8)


def check_output(output: np.ndarray, shape: tuple[int, ...], dtype=np.int8) -> None:
    assert output.shape == shape
    assert output.dtype == dtype
    assert output.min() != output.max(), "output is constant"
    if dtype == np.int8:
        saturated = np.mean((output == -128) | (output == 127))
        assert saturated < 0.9, f"{saturated:.0%} of the outputs saturate"


IMAGE = (1, 12, 12, 4)

# (name, builds the op on an int8 NHWC input x, expected output shape)
SINGLE_OPS = [
    ("conv2d_same_relu", lambda b, x, r: b.conv2d(
        x, filters=6, kernel=3, padding="SAME", activation="RELU", rng=r), (1, 12, 12, 6)),
    ("conv2d_valid_stride2", lambda b, x, r: b.conv2d(
        x, filters=5, kernel=(3, 2), stride=2, padding="VALID", rng=r), (1, 5, 6, 5)),
    ("conv2d_same_stride2_relu6", lambda b, x, r: b.conv2d(
        x, filters=8, kernel=(5, 5), stride=(2, 2), padding="SAME", activation="RELU6",
        rng=r), (1, 6, 6, 8)),
    ("depthwise_same", lambda b, x, r: b.depthwise_conv2d(
        x, kernel=3, padding="SAME", activation="RELU6", rng=r), (1, 12, 12, 4)),
    ("depthwise_valid_multiplier2_stride2", lambda b, x, r: b.depthwise_conv2d(
        x, kernel=(3, 3), depth_multiplier=2, stride=2, padding="VALID", rng=r), (1, 5, 5, 8)),
    ("average_pool_valid", lambda b, x, r: b.average_pool2d(x, pool=2), (1, 6, 6, 4)),
    ("average_pool_same_3x3_stride2", lambda b, x, r: b.average_pool2d(
        x, pool=3, stride=2, padding="SAME"), (1, 6, 6, 4)),
    ("max_pool_valid", lambda b, x, r: b.max_pool2d(x, pool=(2, 3), stride=(2, 3)), (1, 6, 4, 4)),
    ("max_pool_same_relu", lambda b, x, r: b.max_pool2d(
        x, pool=3, stride=1, padding="SAME", activation="RELU"), (1, 12, 12, 4)),
    ("add", lambda b, x, r: b.add(x, b.conv2d(x, filters=4, kernel=1, rng=r)), (1, 12, 12, 4)),
    ("add_relu", lambda b, x, r: b.add(
        b.conv2d(x, filters=4, kernel=1, rng=r), b.conv2d(x, filters=4, kernel=3, rng=r),
        activation="RELU"), (1, 12, 12, 4)),
    ("reshape", lambda b, x, r: b.reshape(x, (1, -1)), (1, 576)),
    ("fully_connected", lambda b, x, r: b.fully_connected(
        b.reshape(x, (1, -1)), units=10, rng=r), (1, 10)),
    ("fully_connected_relu", lambda b, x, r: b.fully_connected(
        b.reshape(x, (12, 48)), units=7, activation="RELU", rng=r), (12, 7)),
    ("softmax", lambda b, x, r: b.softmax(b.reshape(x, (1, -1))), (1, 576)),
    ("pad", lambda b, x, r: b.pad(x, [[0, 0], [1, 2], [0, 1], [0, 0]]), (1, 15, 13, 4)),
    ("mean_keep_dims", lambda b, x, r: b.mean(x, (1, 2), keep_dims=True), (1, 1, 1, 4)),
    ("mean", lambda b, x, r: b.mean(x, (1, 2), keep_dims=False), (1, 4)),
    ("concatenation", lambda b, x, r: b.concatenation(
        [x, b.max_pool2d(x, pool=3, stride=1, padding="SAME")]), (1, 12, 12, 8)),
    ("concatenation_of_convs", lambda b, x, r: b.concatenation([
        b.conv2d(x, filters=3, kernel=1, rng=r, quant=(0.05, -10)),
        b.conv2d(x, filters=5, kernel=3, rng=r, quant=(0.05, -10))]), (1, 12, 12, 8)),
]


@pytest.mark.parametrize(
    "build, shape", [pytest.param(b, s, id=n) for n, b, s in SINGLE_OPS]
)
def test_single_operator_runs_in_litert(build, shape):
    rng = np.random.default_rng(7)
    b = TfliteBuilder(seed=1)
    x = b.input("input", IMAGE, scale=0.05, zero_point=-3)
    b.output(build(b, x, rng))
    (output,) = run_reference(b.finish(), [random_input(rng, IMAGE)])
    check_output(output, shape)


def test_chain_with_float_io_runs_in_litert():
    rng = np.random.default_rng(3)
    b = TfliteBuilder(seed=2)
    x = b.input("input", (1, 16, 16, 3), scale=0.02, zero_point=-5, dtype="float32")
    y = b.conv2d(x, filters=8, kernel=(3, 3), stride=2, padding="SAME", activation="RELU",
                 rng=rng)
    y = b.depthwise_conv2d(y, kernel=(3, 3), depth_multiplier=1, padding="SAME",
                           activation="RELU6", rng=rng)
    z = b.add(y, b.conv2d(y, filters=8, kernel=(1, 1), rng=rng))
    z = b.pad(z, [[0, 0], [1, 1], [1, 1], [0, 0]])
    pooled = b.concatenation([
        b.average_pool2d(z, pool=(2, 2), stride=2, padding="VALID"),
        b.max_pool2d(z, pool=(3, 3), stride=2, padding="SAME"),
    ])
    b.output(b.mean(pooled, (1, 2), keep_dims=True))
    logits = b.fully_connected(b.reshape(pooled, (1, -1)), units=10, rng=rng)
    b.output(b.softmax(logits), dtype="float32")
    image = rng.uniform(-2.5, 2.5, (1, 16, 16, 3)).astype(np.float32)
    mean, probabilities = run_reference(b.finish(), [image])
    check_output(mean, (1, 1, 1, 16))
    check_output(probabilities, (1, 10), np.float32)
    assert abs(probabilities.sum() - 1.0) < 0.05


def test_same_seed_same_model():
    def build() -> bytes:
        b = TfliteBuilder(seed=5)
        x = b.input("input", IMAGE, scale=0.05, zero_point=0)
        b.output(b.conv2d(x, filters=4, rng=np.random.default_rng(9)))
        return b.finish()

    assert build() == build()


def test_model_layout():
    import tflite

    b = TfliteBuilder()
    x = b.input("input", IMAGE, scale=0.05, zero_point=0, dtype="float32")
    y = b.depthwise_conv2d(b.conv2d(x, filters=8), depth_multiplier=2)
    b.output(b.softmax(b.reshape(y, (1, -1))), dtype="float32")
    model = tflite.Model.GetRootAs(b.finish())
    assert model.Version() == 3
    assert model.Buffers(0).DataLength() == 0
    codes = {model.OperatorCodes(i).BuiltinCode(): model.OperatorCodes(i)
             for i in range(model.OperatorCodesLength())}
    quantize = codes[tflite.BuiltinOperator.QUANTIZE]
    assert (quantize.BuiltinCode(), quantize.DeprecatedBuiltinCode()) == (114, 114)
    graph = model.Subgraphs(0)
    tensors = [graph.Tensors(i) for i in range(graph.TensorsLength())]
    conv_filter, depthwise_filter = (
        t for t in tensors if t.Name().decode().endswith("/filter"))
    assert conv_filter.Quantization().QuantizedDimension() == 0
    assert conv_filter.Quantization().ScaleLength() == 8
    assert depthwise_filter.Quantization().QuantizedDimension() == 3
    assert depthwise_filter.ShapeAsNumpy().tolist() == [1, 3, 3, 16]
    constant_buffers = [t.Buffer() for t in tensors if t.Buffer() != 0]
    assert len(constant_buffers) == len(set(constant_buffers)) == 5  # 2 filters, 2 biases, shape


def test_bad_arguments():
    b = TfliteBuilder()
    x = b.input("input", IMAGE, scale=0.05, zero_point=0)
    with pytest.raises(ValueError, match=r"padding must be one of \['SAME', 'VALID'\], not 'FULL'"):
        b.conv2d(x, filters=4, padding="FULL")
    with pytest.raises(ValueError, match="activation must be one of"):
        b.add(x, x, activation="TANH")
    with pytest.raises(ValueError, match="kernel must be a positive integer or a pair"):
        b.conv2d(x, filters=4, kernel=(3, 0))
    other = b.conv2d(x, filters=4, kernel=1, quant=(0.1, 0))
    with pytest.raises(ValueError, match="CONCATENATION inputs must share scale and zero point"):
        b.concatenation([x, other])
    with pytest.raises(ValueError, match=r"cannot reshape \(1, 12, 12, 4\)"):
        b.reshape(x, (5, -1))
    assert isinstance(x, TensorRef)
