"""The NumPy CNN trainer: ONNX export matches the reference, training works, gradients check."""

import numpy as np
import onnx
import pytest

from conftest import reference_session
from npugen.train import cnn_forward, cnn_loss_and_grads, cnn_to_onnx, digits, train_cnn

KEYS = ("conv0.weight", "conv0.bias", "conv1.weight", "conv1.bias", "fc.weight", "fc.bias")


def random_params(rng, channels=(3, 5), dtype=np.float32):
    c0, c1 = channels
    shapes = {"conv0.weight": (c0, 1, 3, 3), "conv0.bias": (c0,),
              "conv1.weight": (c1, c0, 3, 3), "conv1.bias": (c1,),
              "fc.weight": (10, c1 * 16), "fc.bias": (10,)}
    return {key: (rng.standard_normal(shape) * 0.5).astype(dtype)
            for key, shape in shapes.items()}


def test_forward_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(1)
    params = random_params(rng)
    x = rng.random((7, 1, 8, 8), dtype=np.float32)
    model = cnn_to_onnx(params, tmp_path / "cnn.onnx")
    assert [node.op_type for node in model.graph.node] == [
        "Conv", "Relu", "Conv", "Relu", "MaxPool", "Flatten", "Gemm"]
    assert [node.name for node in model.graph.node if node.op_type in ("Conv", "Gemm")] == [
        "conv0", "conv1", "fc"]
    onnx.checker.check_model(onnx.load(tmp_path / "cnn.onnx"))
    (expected,) = reference_session(tmp_path / "cnn.onnx").run(["logits"], {"input": x})
    assert expected.shape == (7, 10)
    np.testing.assert_allclose(cnn_forward(params, x), expected, atol=1e-4, rtol=1e-4)
    # Flat (N, 64) inputs are the same images.
    np.testing.assert_allclose(cnn_forward(params, x.reshape(7, 64)), expected,
                               atol=1e-4, rtol=1e-4)


def test_training_reaches_accuracy():
    x_train, x_test, y_train, y_test = digits()
    params = train_cnn(x_train, y_train, epochs=5, seed=0)
    assert set(params) == set(KEYS)
    assert params["conv0.weight"].shape == (8, 1, 3, 3)
    assert params["conv1.weight"].shape == (16, 8, 3, 3)
    assert params["fc.weight"].shape == (10, 256)
    assert all(value.dtype == np.float32 for value in params.values())
    accuracy = np.mean(cnn_forward(params, x_test).argmax(1) == y_test)
    assert accuracy >= 0.9, accuracy
    # Deterministic for a given seed.
    again = train_cnn(x_train[:200], y_train[:200], epochs=1, seed=3)
    once = train_cnn(x_train[:200], y_train[:200], epochs=1, seed=3)
    assert all(np.array_equal(again[key], once[key]) for key in KEYS)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(2)
    params = random_params(rng, channels=(2, 3), dtype=np.float64)
    x = rng.random((4, 64))
    y = rng.integers(0, 10, 4)
    _, grads = cnn_loss_and_grads(params, x, y)
    assert all(grads[key].shape == params[key].shape for key in KEYS)
    step = 1e-6
    for key in KEYS:
        # The largest-gradient entry of each tensor, so a wrong backward cannot hide.
        index = np.unravel_index(np.abs(grads[key]).argmax(), params[key].shape)
        plus = {k: v.copy() for k, v in params.items()}
        minus = {k: v.copy() for k, v in params.items()}
        plus[key][index] += step
        minus[key][index] -= step
        estimate = (cnn_loss_and_grads(plus, x, y)[0] -
                    cnn_loss_and_grads(minus, x, y)[0]) / (2 * step)
        assert abs(grads[key][index]) > 1e-6, key
        np.testing.assert_allclose(grads[key][index], estimate, rtol=1e-4, atol=1e-7,
                                   err_msg=key)
