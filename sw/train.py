"""The networks npugen trains itself (``npugen demo``, the tests, the benchmarks), exported
to ONNX.

The data is scikit-learn's bundled 8×8 digits (:func:`digits`, no download). The MLP is
scikit-learn's ``MLPClassifier`` (:func:`train_mlp`), exported as Gemm/Relu
(:func:`mlp_to_onnx`). The CNN (``npugen demo --model cnn``) is trained here, in NumPy only::

    conv3x3(1→c0, pad 1) → ReLU → conv3x3(c0→c1, pad 1) → ReLU → MaxPool 2×2/2
        → Flatten (C·H·W) → Dense(c1·4·4 → 10) → logits

It is trained with softmax cross-entropy and Adam from He-initialised weights, fully
deterministic for a given seed.  Internally activations are kept NHWC so that im2col is a
plain reshape; parameters are stored in ONNX layouts (Conv weights OIHW, Gemm weights
(out, in) for ``transB=1``) and the flatten follows NCHW order exactly as ONNX does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["digits", "train_mlp", "mlp_to_onnx", "train_cnn", "init_cnn_params", "cnn_forward",
           "cnn_loss_and_grads", "cnn_to_onnx", "save_classifier_onnx", "DEFAULT_CHANNELS"]

_SIDE = 8        # input images are 8×8, one channel
_CLASSES = 10
_LAYERS = ("conv0", "conv1", "fc")
#: The demo CNN's channels: conv3×3(8), conv3×3(16).
DEFAULT_CHANNELS = (8, 16)


# --- the CNN's building blocks (NHWC activations, OIHW weights) --------------------------

def _as_nhwc(x: np.ndarray, dtype) -> np.ndarray:
    """(N, 64) or (N, 1, 8, 8) → (N, 8, 8, 1) in ``dtype``."""
    x = np.asarray(x, dtype=dtype)
    if x.ndim == 2:
        x = x.reshape(-1, 1, _SIDE, _SIDE)
    if x.shape[1:] != (1, _SIDE, _SIDE):
        raise ValueError(f"expected inputs of shape (N, 64) or (N, 1, 8, 8), got {x.shape}")
    return x.transpose(0, 2, 3, 1)


def _im2col(x: np.ndarray) -> np.ndarray:
    """(N, H, W, C) → (N·H·W, C·9) patches of a 3×3, pad-1 window; column = c·9 + ky·3 + kx."""
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = np.stack([padded[:, ky:ky + h, kx:kx + w, :] for ky in range(3) for kx in range(3)],
                    axis=-1)
    return cols.reshape(n * h * w, c * 9)


def _col2im(cols: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Adjoint of :func:`_im2col`: scatter-add (N·H·W, C·9) patches back to (N, H, W, C)."""
    n, h, w, c = shape
    cols = cols.reshape(n, h, w, c, 3, 3)
    padded = np.zeros((n, h + 2, w + 2, c), dtype=cols.dtype)
    for ky in range(3):
        for kx in range(3):
            padded[:, ky:ky + h, kx:kx + w, :] += cols[..., ky, kx]
    return padded[:, 1:h + 1, 1:w + 1, :]


def _conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray):
    """3×3 pad-1 stride-1 convolution of NHWC ``x``; returns (output NHWC, patches)."""
    n, h, w, _ = x.shape
    cols = _im2col(x)
    out = cols @ weight.reshape(weight.shape[0], -1).T + bias
    return out.reshape(n, h, w, weight.shape[0]), cols


def _pool_windows(x: np.ndarray) -> np.ndarray:
    """(N, H, W, C) → (N, H/2, W/2, C, 4): the 2×2 windows of a stride-2 pool."""
    n, h, w, c = x.shape
    return (x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
            .reshape(n, h // 2, w // 2, c, 4))


def _forward(params: dict, x: np.ndarray):
    """Logits (N, 10) and the intermediate values the backward pass needs."""
    dtype = params["fc.weight"].dtype
    a0 = _as_nhwc(x, dtype)
    z1, cols0 = _conv(a0, params["conv0.weight"], params["conv0.bias"])
    a1 = np.maximum(z1, 0)
    z2, cols1 = _conv(a1, params["conv1.weight"], params["conv1.bias"])
    a2 = np.maximum(z2, 0)
    windows = _pool_windows(a2)
    argmax = windows.argmax(axis=-1)[..., None]
    pooled = np.take_along_axis(windows, argmax, axis=-1)[..., 0]       # (N, 4, 4, C)
    flat = pooled.transpose(0, 3, 1, 2).reshape(len(pooled), -1)        # NCHW flatten
    logits = flat @ params["fc.weight"].T + params["fc.bias"]
    cache = {"cols0": cols0, "z1": z1, "a1": a1, "cols1": cols1, "z2": z2,
             "argmax": argmax, "pooled_shape": pooled.shape, "flat": flat}
    return logits, cache


# --- the CNN -----------------------------------------------------------------------------

def cnn_forward(params: dict, x: np.ndarray) -> np.ndarray:
    """Float reference forward pass: x (N, 64) or (N, 1, 8, 8) → logits (N, 10)."""
    return _forward(params, x)[0]


def cnn_loss_and_grads(params: dict, x: np.ndarray,
                       y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """Mean softmax cross-entropy of the batch and its gradient for every parameter."""
    logits, cache = _forward(params, x)
    n = len(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    labels = np.asarray(y, dtype=np.int64)
    loss = float(-log_probs[np.arange(n), labels].mean())

    dlogits = np.exp(log_probs)
    dlogits[np.arange(n), labels] -= 1
    dlogits /= n
    grads = {"fc.weight": dlogits.T @ cache["flat"], "fc.bias": dlogits.sum(axis=0)}

    # Unflatten (NCHW order) and route through the max-pool to the winning inputs.
    pn, ph, pw, pc = cache["pooled_shape"]
    dpooled = (dlogits @ params["fc.weight"]).reshape(pn, pc, ph, pw).transpose(0, 2, 3, 1)
    dwindows = np.zeros((pn, ph, pw, pc, 4), dtype=dpooled.dtype)
    np.put_along_axis(dwindows, cache["argmax"], dpooled[..., None], axis=-1)
    da2 = (dwindows.reshape(pn, ph, pw, pc, 2, 2).transpose(0, 1, 4, 2, 5, 3)
           .reshape(pn, ph * 2, pw * 2, pc))

    dz2 = (da2 * (cache["z2"] > 0)).reshape(-1, pc)
    w1 = params["conv1.weight"]
    grads["conv1.weight"] = (dz2.T @ cache["cols1"]).reshape(w1.shape)
    grads["conv1.bias"] = dz2.sum(axis=0)

    da1 = _col2im(dz2 @ w1.reshape(w1.shape[0], -1), cache["a1"].shape)
    dz1 = (da1 * (cache["z1"] > 0)).reshape(-1, cache["z1"].shape[-1])
    w0 = params["conv0.weight"]
    grads["conv0.weight"] = (dz1.T @ cache["cols0"]).reshape(w0.shape)
    grads["conv0.bias"] = dz1.sum(axis=0)
    return loss, grads


def init_cnn_params(channels: tuple[int, int] = DEFAULT_CHANNELS,
                    rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Untrained CNN params: He-normal weights, zero biases, float32, ONNX layouts."""
    rng = rng or np.random.default_rng(0)
    c0, c1 = channels
    shapes = {"conv0": (c0, 1, 3, 3), "conv1": (c1, c0, 3, 3),
              "fc": (_CLASSES, c1 * (_SIDE // 2) ** 2)}
    params = {}
    for name in _LAYERS:
        shape = shapes[name]
        fan_in = int(np.prod(shape[1:]))
        params[f"{name}.weight"] = (rng.standard_normal(shape) *
                                    np.sqrt(2.0 / fan_in)).astype(np.float32)
        params[f"{name}.bias"] = np.zeros(shape[0], dtype=np.float32)
    return params


def train_cnn(x: np.ndarray, y: np.ndarray, *, channels: tuple[int, int] = DEFAULT_CHANNELS,
              epochs: int = 30, seed: int = 0, batch_size: int = 32,
              learning_rate: float = 0.01) -> dict[str, np.ndarray]:
    """Train the tiny CNN with Adam on (N, 64) images in [0, 1]; returns float32 params.

    Keys: ``conv0.weight`` (c0, 1, 3, 3), ``conv0.bias``, ``conv1.weight`` (c1, c0, 3, 3),
    ``conv1.bias``, ``fc.weight`` (10, c1·16) and ``fc.bias``.
    """
    x = np.asarray(x, dtype=np.float32).reshape(-1, 1, _SIDE, _SIDE)
    y = np.asarray(y, dtype=np.int64)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    rng = np.random.default_rng(seed)
    params = init_cnn_params(channels, rng)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            _, grads = cnn_loss_and_grads(params, x[batch], y[batch])
            step += 1
            scale = float(learning_rate * np.sqrt(1 - beta2 ** step) / (1 - beta1 ** step))
            for key, grad in grads.items():
                m[key] = beta1 * m[key] + (1 - beta1) * grad
                v[key] = beta2 * v[key] + (1 - beta2) * grad * grad
                params[key] -= (scale * m[key] / (np.sqrt(v[key]) + eps)).astype(np.float32)
    return params


def cnn_to_onnx(params: dict, path: str | Path, opset: int = 17):
    """Export trained CNN params as Conv/Relu/MaxPool/Flatten/Gemm ONNX (logits out)."""
    from onnx import helper, numpy_helper

    initializers = [numpy_helper.from_array(np.asarray(params[f"{name}.{kind}"], np.float32),
                                            f"{name}.{kind}")
                    for name in _LAYERS for kind in ("weight", "bias")]
    nodes = []
    previous = "input"
    for index in range(2):
        name = f"conv{index}"
        nodes.append(helper.make_node("Conv", [previous, f"{name}.weight", f"{name}.bias"],
                                      [name], name=name, kernel_shape=[3, 3],
                                      pads=[1, 1, 1, 1], strides=[1, 1]))
        nodes.append(helper.make_node("Relu", [name], [f"relu{index}"], name=f"relu{index}"))
        previous = f"relu{index}"
    nodes += [
        helper.make_node("MaxPool", [previous], ["pool"], name="pool", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flatten"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flatten", "fc.weight", "fc.bias"], ["logits"], name="fc",
                         transB=1),
    ]
    return save_classifier_onnx(nodes, initializers, "cnn", ["batch", 1, _SIDE, _SIDE],
                                params["fc.weight"].shape[0], path, opset)


# --- the data, the MLP, the ONNX file ----------------------------------------------------

def digits(seed: int = 0):
    """(x_train, x_test, y_train, y_test): 8×8 digits scaled to [0, 1], 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    return train_test_split(x, data.target, test_size=0.2, random_state=seed,
                            stratify=data.target)


def train_mlp(x: np.ndarray, y: np.ndarray, hidden: tuple[int, ...] = (64, 32), seed: int = 0):
    """A scikit-learn ``MLPClassifier`` with ReLU ``hidden`` layers, fitted to ``x``, ``y``."""
    from sklearn.neural_network import MLPClassifier

    classifier = MLPClassifier(hidden_layer_sizes=hidden, activation="relu", max_iter=400,
                               random_state=seed)
    classifier.fit(x, y)
    return classifier


def mlp_to_onnx(classifier, path: str | Path, opset: int = 17):
    """Export a trained MLPClassifier as Gemm/Relu ONNX (logits out, no softmax)."""
    from onnx import helper, numpy_helper

    nodes, initializers = [], []
    previous = "input"
    count = len(classifier.coefs_)
    for index, (weight, bias) in enumerate(zip(classifier.coefs_, classifier.intercepts_,
                                               strict=True)):
        w, b = f"fc{index}.weight", f"fc{index}.bias"
        initializers += [numpy_helper.from_array(weight.astype(np.float32), w),
                         numpy_helper.from_array(bias.astype(np.float32), b)]
        out = "logits" if index == count - 1 else f"fc{index}"
        nodes.append(helper.make_node("Gemm", [previous, w, b], [out], name=f"fc{index}"))
        if index < count - 1:
            nodes.append(helper.make_node("Relu", [out], [f"relu{index}"], name=f"relu{index}"))
            out = f"relu{index}"
        previous = out
    features = classifier.coefs_[0].shape[0]
    classes = classifier.coefs_[-1].shape[1]
    return save_classifier_onnx(nodes, initializers, "mlp", ["batch", features], classes,
                                path, opset)


def save_classifier_onnx(nodes: list, initializers: list, name: str, input_shape: list,
                         classes: int, path: str | Path, opset: int = 17):
    """A graph from ``input`` (float, ``input_shape``) to ``logits`` (batch, classes):
    checked, saved to ``path`` and returned."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model
