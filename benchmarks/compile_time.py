"""Compile time of a 784-128-10 MLP (the size of an MNIST MLP), float ONNX with
calibration, on an 8×8 NPU with a weight memory large enough for its 100 KB of weights.

    python benchmarks/compile_time.py [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper, save

from npugen.compiler import compile_model
from npugen.config import NpuConfig
from npugen.importers import load_model


def mlp_onnx(path: Path, sizes: list[int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    nodes, inits, previous = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        inits += [numpy_helper.from_array(rng.normal(0, a ** -0.5, (a, b)).astype(np.float32),
                                          f"w{i}"),
                  numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"], [f"y{i}"],
                                      name=f"fc{i}"))
        previous = f"y{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [previous], [f"r{i}"], name=f"relu{i}"))
            previous = f"r{i}"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", sizes[0]])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["n", sizes[-1]])], inits)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [784, 128, 10]
    config = NpuConfig(weight_depth=16384)
    calibration = np.random.default_rng(1).random((256, 784), dtype=np.float32)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mlp.onnx"
        mlp_onnx(path, sizes)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            program = compile_model(load_model(path), config, calibration)
            program.to_bytes()
            times.append(time.perf_counter() - started)
    record = {"model": "MLP 784-128-10", "config": config.describe(),
              "weight_depth": config.weight_depth, "batch": program.batch,
              "instructions": program.instruction_count,
              "compile_seconds_best_of_3": round(min(times), 3),
              "estimated_cycles_per_inference": program.estimated_cycles / program.batch}
    print(f"{record['model']} on {record['config']}: compiled (import, quantize, schedule, "
          f"serialize) in {record['compile_seconds_best_of_3']} s, "
          f"{record['instructions']} instructions, batch {record['batch']}")
    if args.json:
        print(json.dumps(record))


if __name__ == "__main__":
    main()
