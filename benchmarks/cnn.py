"""Convolution benchmarks on the RTL: utilization of feature-map operators, and the demo
CNN's per-layer cycles.

    python benchmarks/cnn.py [--quick] [--json] [--sim verilator|icarus]

Each operator runs on the NPU's RTL (cocotb) with seeded random int8 data; its output is
checked against a direct NumPy computation and its cycle count against the golden cycle
model. Utilization = useful MACs / (rows · cols · cycles), the whole run counted (start,
weight loads, requantization, drain). Prints a Markdown table and, with --json, one JSON
object as the last line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from npugen.arith import requantize
from npugen.config import NpuConfig
from npugen.featuremap import FeatureMap
from npugen.isa import Instruction, Opcode, encode_program
from npugen.job import Job, run_golden
from npugen.lowering import Lowering, Requant
from npugen.memory_map import Region
from npugen.sim.runner import simulate


def direct_conv(x: np.ndarray, weight: np.ndarray, pad: int, fill: int) -> np.ndarray:
    """(C, H, W) * (kh, kw, C_in, C_out), stride 1, by definition."""
    kh, kw, _, c_out = weight.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    out_h, out_w = padded.shape[1] - kh + 1, padded.shape[2] - kw + 1
    acc = np.zeros((c_out, out_h, out_w), dtype=np.int64)
    for dy in range(kh):
        for dx in range(kw):
            window = padded[:, dy:dy + out_h, dx:dx + out_w]
            acc += np.einsum("chw,cn->nhw", window, weight[dy, dx])
    return acc


def operator_record(config: NpuConfig, kind: str, channels: int, out_channels: int,
                    size: int, kernel: int, simulator: str) -> dict:
    rng = np.random.default_rng(1)
    pad = kernel // 2
    fill = 3
    x = rng.integers(-128, 128, (channels, size, size))
    src = FeatureMap(0, channels, size, size, config.rows, config.cols, (pad,) * 4, fill)
    dst = FeatureMap(src.end, out_channels, size, size, config.rows, config.cols)
    bias = rng.integers(-5000, 5000, out_channels)
    multiplier = rng.integers(1 << 30, (1 << 31) - 1, out_channels)
    shift = np.full(out_channels, 8 if kind == "conv" else 4)
    requant = Requant(bias, multiplier, shift, -5)
    lowering = Lowering(config)
    if kind == "conv":
        weight = rng.integers(-128, 128, (kernel, kernel, channels, out_channels))
        lowering.conv(src, dst, weight, requant, 1, (pad,) * 4)
        acc = direct_conv(x, weight, pad, fill)
        macs = size * size * weight.size
    else:
        weight = rng.integers(-128, 128, (kernel, kernel, channels))
        lowering.depthwise(src, dst, weight, requant, 1, (pad,) * 4)
        full = np.zeros((kernel, kernel, channels, channels), dtype=np.int64)
        for channel in range(channels):
            full[:, :, channel, channel] = weight[:, :, channel]
        acc = direct_conv(x, full, pad, fill)
        macs = size * size * weight.size
    program = lowering.instructions + [Instruction(Opcode.HALT)]
    job = Job(config)
    job.write(Region.INSTRUCTIONS, 0, encode_program(program))
    job.write(Region.ACTIVATIONS, 0, src.pack(x))
    job.write(Region.WEIGHTS, 0, lowering.weights())
    job.write(Region.PARAMS, 0, lowering.params())
    job.read("output", Region.ACTIVATIONS, dst.base, dst.data_words)
    expected = requantize(acc.transpose(1, 2, 0), bias, multiplier, shift, -5, -128, 127,
                          accumulator_width=32, output_width=8).transpose(2, 0, 1)
    golden = run_golden(job)
    started = time.perf_counter()
    result = simulate([job], simulator=simulator)[0]
    cycles = result.counters.cycles
    return {
        "workload": (f"{kind} {kernel}x{kernel}, {channels}->{out_channels} channels, "
                     f"{size}x{size}, pad {pad}"),
        "array": f"{config.rows}x{config.cols}, {config.requant_lanes} lane(s)",
        "simulator": simulator, "cycles": cycles, "model_cycles": golden.counters.cycles,
        "macs": macs, "utilization": round(macs / (config.macs_per_cycle * cycles), 4),
        "instructions": len(program),
        "bit_exact": bool(np.array_equal(dst.unpack(result.outputs["output"]), expected)),
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


def demo_cnn_layers(config: NpuConfig) -> dict:
    """The demo CNN (trained as `npugen demo --model cnn` does): per-layer figures from the
    compiled program (cycle model, which the RTL's counters equal)."""
    import tempfile
    from pathlib import Path

    from npugen.compiler import compile_model
    from npugen.demo import digits
    from npugen.importers import load_onnx
    from npugen.train import cnn_to_onnx, train_cnn

    x_train, _, y_train, _ = digits()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cnn.onnx"
        cnn_to_onnx(train_cnn(x_train, y_train), path)
        program = compile_model(load_onnx(path), config,
                                calibration=x_train[:256].reshape(-1, 1, 8, 8))
    return {"cycles": program.estimated_cycles, "layers": [
        {k: layer[k] for k in ("name", "kind", "input", "output", "macs", "cycles",
                               "utilization")} for layer in program.layers]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sim", choices=("verilator", "icarus"), default="verilator")
    args = parser.parse_args()
    config = NpuConfig()   # 8x8, 8 requantization lanes
    size = 8 if args.quick else 16
    records = [
        operator_record(config, "conv", 32, 32, size, 3, args.sim),
        operator_record(config, "conv", 3, 16, size, 3, args.sim),
        operator_record(config, "depthwise", 32, 32, size, 3, args.sim),
    ]
    print("| workload | array | cycles | MACs | utilization | bit-exact | cycles = model |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['workload']} | {r['array']} | {r['cycles']:,} | {r['macs']:,} | "
              f"{r['utilization']:.3f} | {r['bit_exact']} | "
              f"{r['cycles'] == r['model_cycles']} |")
    demo = demo_cnn_layers(config)
    print(f"\nDemo CNN on {config.rows}x{config.cols}: {demo['cycles']} cycles per inference")
    print("| layer | kind | output | MACs | cycles | utilization |")
    print("|---|---|---|---|---|---|")
    for layer in demo["layers"]:
        shape = "x".join(map(str, layer["output"]))
        print(f"| {layer['name']} | {layer['kind']} | {shape} | {layer['macs']:,} | "
              f"{layer['cycles']:,} | {layer['utilization']:.3f} |")
    if args.json:
        print(json.dumps({"operators": records, "demo_cnn": demo,
                          "machine": platform.platform(), "python": platform.python_version()},
                         sort_keys=True))


if __name__ == "__main__":
    main()
