"""How often npugen's int8 outputs equal onnxruntime's on a QDQ CNN.

    python benchmarks/onnxruntime_agreement.py

The demo CNN (10 epochs, as tests/test_cnn.py trains it) is quantized by onnxruntime's
quantize_static (per-tensor and per-channel, 200 calibration digits), compiled for the
default 8×8 NPU (an ONNX model's layers round once, as ONNX does), and run on the golden
model over
the 360 held-out digits; prints the largest difference in output steps and the share of
identical outputs. Uses the comparison helpers of tests/conftest.py, whose onnxruntime
session has graph optimizations off (ORT_DISABLE_ALL): the default fuses the QDQ nodes into
int8 kernels whose results depend on the CPU (issue 19).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import quantize_with_onnxruntime, steps_from_onnxruntime  # noqa: E402
from npugen import NpuConfig  # noqa: E402
from npugen.compiler import compile_model  # noqa: E402
from npugen.importers import load_onnx  # noqa: E402
from npugen.train import cnn_to_onnx, digits, train_cnn  # noqa: E402


def main() -> None:
    x_train, x_test, y_train, _ = digits()
    folder = Path(tempfile.mkdtemp())
    cnn_to_onnx(train_cnn(x_train, y_train, epochs=10), folder / "cnn.onnx")
    x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    print("| weights | max difference (steps) | identical |")
    print("|---|---|---|")
    for per_channel in (False, True):
        qdq = folder / "qdq.onnx"
        quantize_with_onnxruntime(folder / "cnn.onnx", qdq, x_train[:200],
                                  per_channel=per_channel)
        program = compile_model(load_onnx(qdq), NpuConfig())
        difference = steps_from_onnxruntime(program, qdq, x_test)
        print(f"| {'per-channel' if per_channel else 'per-tensor'} | {difference.max()} | "
              f"{np.mean(difference == 0):.4f} |")


if __name__ == "__main__":
    main()
