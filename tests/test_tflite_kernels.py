"""npugen.tflite_kernels equals LiteRT's reference (BUILTIN_REF) kernels bit for bit."""

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from test_tflite_builder import run_reference
from tflite_builder import TfliteBuilder

from conftest import MLPERF_TINY
from npugen.tflite_kernels import SoftmaxParams, dequantize, quantize, softmax_int8

# Softmax input scales of the MLPerf Tiny models (resnet, kws, vww).
MLPERF_SCALES = [0.17185351252555847, 0.14469251036643982, 0.014636218547821045]


def softmax_model(rows: int, classes: int, scale: float, zero_point: int, beta: float) -> bytes:
    b = TfliteBuilder()
    x = b.input("logits", (rows, classes), scale=scale, zero_point=zero_point)
    b.output(b.softmax(x, beta=beta))
    return b.finish()


def softmax_inputs(rng: np.random.Generator, classes: int) -> np.ndarray:
    """Random rows, narrow-range rows and the extremes (all -128, all 127, one-hot 127)."""
    rows = [rng.integers(-128, 128, (40, classes)),
            rng.integers(-20, 20, (4, classes)),
            np.full((1, classes), -128), np.full((1, classes), 127)]
    for low in (-128, 0, 100):
        one_hot = np.full((1, classes), low)
        one_hot[0, rng.integers(classes)] = 127
        rows.append(one_hot)
    tied = np.full((1, classes), -128)
    tied[0, :2] = 127
    rows.append(tied)
    return np.concatenate(rows).astype(np.int8)


@pytest.mark.parametrize("classes", [2, 10, 12, 1000])
@pytest.mark.parametrize("scale", [0.01, 0.03125, 0.1, 0.25, 0.5, *MLPERF_SCALES])
def test_softmax_equals_litert(scale, classes):
    rng = np.random.default_rng(classes)
    x = softmax_inputs(rng, classes)
    if classes == 1000:
        # The reference kernel aborts the process on rows whose exps sum to 512 or more
        # (e.g. all equal); keep the rows it can run.
        runnable = [row for row in x if _runnable(row, scale)]
        assert len(runnable) >= 10
        x = np.stack(runnable)
    (expected,) = run_reference(softmax_model(len(x), classes, scale, 5, 1.0), [x])
    np.testing.assert_array_equal(softmax_int8(x, scale), expected)


def _runnable(row: np.ndarray, scale: float, beta: float = 1.0) -> bool:
    try:
        softmax_int8(row, scale, beta)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("beta", [0.25, 0.5, 2.0, 3.7])
@pytest.mark.parametrize("scale", [0.02, 0.17185351252555847])
def test_softmax_beta_equals_litert(scale, beta):
    x = softmax_inputs(np.random.default_rng(1), 10)
    (expected,) = run_reference(softmax_model(len(x), 10, scale, -7, beta), [x])
    np.testing.assert_array_equal(softmax_int8(x, scale, beta), expected)


def test_softmax_params_and_batches():
    params = SoftmaxParams.from_scale(0.17185351252555847)
    assert 2**30 <= params.input_multiplier < 2**31
    assert params.diff_min == -((31 << 26) >> params.input_left_shift)
    x = np.random.default_rng(0).integers(-128, 128, (2, 3, 10)).astype(np.int8)
    batched = softmax_int8(x, params=params)
    flat = softmax_int8(x.reshape(6, 10), params=params)
    np.testing.assert_array_equal(batched.reshape(6, 10), flat)


def test_softmax_rejects_what_the_kernel_aborts_on():
    assert _runnable(np.full(511, -128, np.int8), 0.1)
    with pytest.raises(ValueError, match="sum of exps reaches 512"):
        softmax_int8(np.full(512, -128, np.int8), 0.1)
    with pytest.raises(ValueError, match="below 2\\*\\*-26"):
        SoftmaxParams.from_scale(1e-9)
    with pytest.raises(ValueError, match="takes int8 input, not int32"):
        softmax_int8(np.zeros(4, np.int32), 0.1)


QUANT_PARAMS = [(0.25, 0), (0.02, -5), (0.1, 100), (1 / 3, 7),
                (0.003921568859368563, -128), (0.5847029089927673, 83)]


@pytest.mark.parametrize("scale, zero_point", QUANT_PARAMS)
def test_quantize_equals_litert(scale, zero_point):
    rng = np.random.default_rng(2)
    values = rng.uniform(-300 * scale, 300 * scale, 4096).astype(np.float32)
    halves = (rng.integers(-200, 200, 1000) + 0.5) * scale
    values[:1000] = halves  # ties when the quotient is exact: rounded away from zero
    values[1000:1010] = np.nextafter(halves[:10].astype(np.float32), np.float32(0))
    values[1010:1020] = [np.inf, -np.inf, np.nan, 1e10, -1e10, 3e9, -3e9, 0.0, -0.0, 1e-30]
    b = TfliteBuilder()
    b.output(b.input("x", (1, 4096), scale=scale, zero_point=zero_point, dtype="float32"))
    (expected,) = run_reference(b.finish(), [values[None]])
    np.testing.assert_array_equal(quantize(values[None], scale, zero_point), expected)


def test_quantize_rounds_half_away_from_zero():
    np.testing.assert_array_equal(
        quantize(np.array([0.125, -0.125, 0.375, -0.375], np.float32), 0.25, 0), [1, -1, 2, -2]
    )


@pytest.mark.parametrize("scale, zero_point", QUANT_PARAMS)
def test_dequantize_equals_litert(scale, zero_point):
    q = np.arange(-128, 128, dtype=np.int8)[None]
    b = TfliteBuilder()
    b.output(b.input("x", q.shape, scale=scale, zero_point=zero_point), dtype="float32")
    (expected,) = run_reference(b.finish(), [q])
    result = dequantize(q, scale, zero_point)
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result.view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize(
    "model", ["kws_ref_model", "pretrainedResnet_quant", "vww_96_int8"]
)
def test_softmax_of_mlperf_tiny_models(model):
    path = MLPERF_TINY / f"{model}.tflite"
    interpreter = Interpreter(
        model_path=str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
        experimental_preserve_all_tensors=True,
    )
    interpreter.allocate_tensors()
    (softmax,) = [op for op in interpreter._get_ops_details() if op["op_name"] == "SOFTMAX"]
    (logits_index,) = softmax["inputs"]
    logits_details = interpreter.get_tensor_details()[logits_index]
    scale = float(logits_details["quantization_parameters"]["scales"][0])
    assert scale in MLPERF_SCALES
    source = interpreter.get_input_details()[0]
    output = interpreter.get_output_details()[0]
    rng = np.random.default_rng(4)
    for _ in range(4):
        interpreter.set_tensor(
            source["index"], rng.integers(-128, 128, source["shape"]).astype(np.int8)
        )
        interpreter.invoke()
        logits = interpreter.get_tensor(logits_index)
        np.testing.assert_array_equal(
            softmax_int8(logits, scale), interpreter.get_tensor(output["index"])
        )
