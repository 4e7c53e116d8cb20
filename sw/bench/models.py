"""Models end to end (the demo MLP and CNN), convolution operators on the RTL, and
compile time."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import NpuConfig

#: Held-out images run on the RTL in --quick mode (all 360 otherwise; the golden model
#: always runs all of them).
QUICK_RTL_IMAGES = {"mlp": 32, "cnn": 4}


def board_fmax(recorded_dir: Path) -> dict[str, dict[str, Any]]:
    """Each board's recorded default build (``boards.json``), by board name."""
    path = recorded_dir / "boards.json"
    if not path.exists():
        return {}
    return {r["board"]: r for r in json.loads(path.read_text())["records"]}


def recorded_build(board, builds: dict[str, dict[str, Any]]
                   ) -> tuple[dict[str, Any] | None, list[str]]:
    """``board``'s recorded build in ``builds`` (:func:`board_fmax`) if it built the same
    array as the board's default now, with the names of the config fields that differ
    (other memories, say: its Fmax then stands for the default's only approximately);
    ``(None, [])`` when there is none, it failed, or its array is another."""
    build = builds.get(board.name)
    config = board.default_config
    if not (build and build.get("fmax_mhz")) or (build["rows"], build["cols"]) != (
            config.rows, config.cols):
        return None, []
    if "config" not in build:
        return build, []
    # A field the build's record lacks is one added since: the build had its default.
    built = {**NpuConfig().to_dict(), **build["config"]}
    return build, sorted(k for k, v in config.to_dict().items() if built[k] != v)


def short_config(config: NpuConfig) -> str:
    """``8×8, 1 lane, no FM``: the array, requantizer lanes (``overlap``: beside the
    array), the depthwise mode's line buffers (and its tap row), the rescale tables, the
    weight segments and feature-map hardware."""
    lanes = config.requant_lanes
    return (f"{config.rows}×{config.cols}, {lanes} lane{'s' if lanes > 1 else ''}"
            + (", overlap" if config.requant_overlap else "")
            + (", line buffers" if config.line_buffer_depth else "")
            + (", tap row" if config.depthwise_tap_row else "")
            + (", rescale tables" if config.rescale_tables else "")
            + (f", {config.weight_segments} weight segments" if config.weight_segments > 1
               else "")
            + ("" if config.feature_maps else ", no FM"))


def model_record(kind: str, quick: bool, boards: dict[str, dict[str, Any]],
                 progress: Callable[[str], None]) -> dict[str, Any]:
    """The demo network ``kind`` (``"mlp"`` or ``"cnn"``) trained, compiled for the default
    :class:`~npugen.config.NpuConfig` and run end to end: float and int8 accuracy on the
    held-out digits; the NPU's outputs and counters against the golden model's (``quick``:
    the first ``QUICK_RTL_IMAGES[kind]`` images on the RTL in Verilator; otherwise all of
    them on the virtual board); cycles and utilization at a full batch, per layer where the
    program has layer figures; and for each board's default config whether the network
    fits, its cycles per inference and, where ``boards`` (:func:`board_fmax`) has the
    board's Fmax, latency and GMAC/s at it.

    Raises ``ValueError`` if the network does not compile for the default config, and a
    ``RuntimeError`` (:class:`~npugen.sim.common.SimulationError`,
    :class:`~npugen.driver.DeviceError`) if the run on the RTL or the virtual board fails."""
    from ..boards import BOARDS, soc_clock_hz
    from ..compiler import compile_model
    from ..demo import train_demo_model
    from ..importers import load_onnx
    from ..runtime import run

    with tempfile.TemporaryDirectory(prefix="npugen-bench-") as folder:
        path, x_train, x_test, y_test = train_demo_model(kind, Path(folder))
        model = load_onnx(path)
        calibration = x_train[:256]
        config = NpuConfig()
        program = compile_model(model, config, calibration=calibration)
        golden = run(program, x_test, target="golden")
        count = QUICK_RTL_IMAGES[kind] if quick else len(x_test)
        target = "rtl" if quick else "sim"
        progress(f"e2e: {kind} on {count} images, target {target}")
        started = time.perf_counter()
        npu = run(program, x_test[:count], target=target)
        npu_seconds = time.perf_counter() - started
        reference = run(program, x_test[:count], target="golden")
        record: dict[str, Any] = {
            "model": kind, "config": short_config(config), "batch": program.batch,
            "float_accuracy": float(np.mean(model.forward(x_test).argmax(1) == y_test)),
            "int8_accuracy": float(np.mean(golden.output.argmax(1) == y_test)),
            "test_images": len(x_test), "npu_target": target, "npu_images": count,
            "npu_seconds": round(npu_seconds, 1),
            "bit_exact": bool(np.array_equal(npu.quantized_output, reference.quantized_output)),
            "cycles_equal_model": npu.counters == reference.counters,
            # Per inference at a full batch: the held-out set's last run is partial.
            **{k: golden.stats(program)[key] for k, key in (
                ("cycles", "cycles_full_batch"), ("macs", "macs"),
                ("utilization", "utilization_full_batch"))},
            "boards": []}
        if "cycles" in program.layers[0]:
            record["layers"] = [{k: layer[k] for k in ("name", "kind", "output", "macs",
                                                       "cycles", "utilization")}
                                for layer in program.layers]
        for board in BOARDS.values():
            entry: dict[str, Any] = {"board": board.name,
                                     "config": short_config(board.default_config)}
            try:
                batched = compile_model(model, board.default_config, calibration=calibration)
                single = compile_model(model, board.default_config, calibration=calibration,
                                       batch=1)
            except ValueError as error:
                entry["fits"] = False
                entry["reason"] = str(error).split(";")[0]
                record["boards"].append(entry)
                continue
            entry.update(fits=True, batch=batched.batch,
                         cycles_per_inference=batched.estimated_cycles / batched.batch,
                         batch1_cycles=single.estimated_cycles,
                         macs_per_cycle=round(batched.macs_per_inference * batched.batch
                                              / batched.estimated_cycles, 2))
            build, differs = recorded_build(board, boards)
            # The latency at the clock is at the board's clock today, which the recorded
            # build may not have been made for (then named among the differences).
            clock = soc_clock_hz(board) / 1e6
            if build and abs(build["target_mhz"] - clock) > 0.01 * clock:
                differs = [*differs, "clock"]
            if differs:
                entry["fmax_build_differs"] = differs
            if build:
                fmax = build["fmax_mhz"]
                entry.update(fmax_mhz=fmax, clock_mhz=clock,
                             us_per_inference=round(entry["cycles_per_inference"] / fmax, 3),
                             achieved_gmacs=round(entry["macs_per_cycle"] * fmax / 1e3, 4),
                             batch1_latency_us=round(single.estimated_cycles / fmax, 3),
                             batch1_latency_us_at_clock=round(
                                 single.estimated_cycles / clock, 3))
            record["boards"].append(entry)
    return record


def run_e2e(*, quick: bool, progress: Callable[[str], None], recorded_dir: Path
            ) -> dict[str, Any]:
    """Section ``e2e``: :func:`model_record` of the demo MLP and CNN, with each board's
    Fmax from ``recorded_dir``'s ``boards.json`` (none where it is missing)."""
    boards = board_fmax(recorded_dir)
    return {"records": [model_record(kind, quick, boards, progress) for kind in ("mlp", "cnn")],
            "boards_source": str(recorded_dir / "boards.json") if boards else None}


# -- Convolution operators --------------------------------------------------------------

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
                    size: int, kernel: int, simulator: str = "verilator") -> dict[str, Any]:
    """One conv or depthwise layer on the RTL: output against a direct NumPy computation,
    cycles against the cycle model."""
    from ..arith import requantize
    from ..featuremap import FeatureMap
    from ..isa import Instruction, Opcode, encode_program
    from ..job import Job, run_golden
    from ..lowering import Lowering, Requant
    from ..memory_map import Region
    from ..sim.runner import simulate

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
    result = simulate([job], simulator=simulator)[0]
    cycles = result.counters.cycles
    return {
        "workload": (f"{'conv' if kind == 'conv' else 'depthwise'} {kernel}×{kernel}, "
                     f"{channels} → {out_channels} channels, {size}×{size}, pad {pad}"),
        "kind": kind, "rows": config.rows, "cols": config.cols, "simulator": simulator,
        "cycles": cycles, "model_cycles": golden.counters.cycles, "macs": macs,
        "utilization": round(macs / (config.macs_per_cycle * cycles), 4),
        "instructions": len(program),
        "bit_exact": bool(np.array_equal(dst.unpack(result.outputs["output"]), expected)),
    }


def run_cnn(*, quick: bool, progress: Callable[[str], None], recorded_dir: Path
            ) -> dict[str, Any]:
    """Section ``cnn``: :func:`operator_record` of a 3×3 convolution (32 → 32 channels),
    one with 3 input channels (3 → 16) and a 3×3 depthwise convolution (32 channels), on
    16×16 maps (``quick``: 8×8), on the default NpuConfig in Verilator. ``recorded_dir``
    is not used. Raises :class:`~npugen.sim.common.SimulationError` if Verilator fails."""
    config = NpuConfig()
    size = 8 if quick else 16
    progress(f"cnn: conv, conv with 3 input channels, depthwise at {size}×{size}")
    return {"records": [operator_record(config, "conv", 32, 32, size, 3),
                        operator_record(config, "conv", 3, 16, size, 3),
                        operator_record(config, "depthwise", 32, 32, size, 3)]}


# -- Compile time -----------------------------------------------------------------------

def mlp_onnx(path: Path, sizes: list[int], seed: int = 0) -> None:
    """A float Gemm/Relu MLP with random weights of ``sizes``, saved to ``path``."""
    from onnx import TensorProto, helper, numpy_helper, save

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


def run_compile(*, quick: bool, progress: Callable[[str], None], recorded_dir: Path
                ) -> dict[str, Any]:
    """Section ``compile``: the best of three times to import, quantize (256 random
    calibration rows), compile and serialize a float 784-128-10 MLP of random weights for
    the default 8×8 with ``weight_depth`` 16384, with the program's instruction count and
    its estimated and ideal cycles per inference. ``quick`` and ``recorded_dir`` are not
    used."""
    from ..compiler import compile_model
    from ..importers import load_model

    sizes = [784, 128, 10]
    config = NpuConfig(weight_depth=16384)  # its 100 KB of weights
    calibration = np.random.default_rng(1).random((256, 784), dtype=np.float32)
    times = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mlp.onnx"
        mlp_onnx(path, sizes)
        for _ in range(3):
            started = time.perf_counter()
            program = compile_model(load_model(path), config, calibration)
            program.to_bytes()
            times.append(time.perf_counter() - started)
    return {"model": "MLP 784-128-10", "config": config.describe(),
            "weight_depth": config.weight_depth, "batch": program.batch,
            "instructions": program.instruction_count,
            "compile_seconds_best_of_3": round(min(times), 3),
            "estimated_cycles_per_inference": program.estimated_cycles / program.batch,
            "ideal_cycles_per_inference": program.macs_per_inference / config.macs_per_cycle}
