"""GEMM cycles on the RTL beside SCALE-Sim, and simulation speed of each simulator."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import NpuConfig

#: Arrays and GEMM shapes (M, K, N) of the grid; --quick runs the first two arrays.
ARRAYS = ((4, 4), (8, 8), (2, 2), (16, 16), (4, 8))
QUICK_ARRAYS = 2
SHAPES = ((64, 64, 64), (128, 128, 128), (256, 256, 256), (512, 64, 64), (16, 256, 256),
          (100, 30, 50), (256, 32, 512))
#: --quick: SCALE-Sim simulates 20–35 k cycles a second, so the largest shapes stay out.
QUICK_SHAPES = ((64, 64, 64), (128, 128, 128), (512, 64, 64), (16, 256, 256), (100, 30, 50))
#: The one workload every simulator runs, on 4x4 and 8x8.
SPEED_WORKLOAD = (64, 64, 64)


def bench_config(rows: int, cols: int) -> NpuConfig:
    """An NPU with memories deep enough for every shape of the grid."""
    return NpuConfig(rows=rows, cols=cols, activation_depth=16384, weight_depth=16384,
                     accumulator_depth=16384, instruction_depth=8192)


def gemm_operands(m: int, k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random int8 values (in int64 arrays) for A (m×k) and W (k×n), the same for a given
    ``seed``."""
    rng = np.random.default_rng(seed)
    return rng.integers(-128, 128, (m, k)), rng.integers(-128, 128, (k, n))


def run_on_rtl(config: NpuConfig, shapes: list[tuple[int, int, int]], simulator: str,
               repeat: int = 1) -> list[dict[str, Any]]:
    """Run each GEMM (``repeat`` times) in one simulation; per shape: cycles, model
    cycles, ideal cycles, bit-exactness, and simulated cycles per wall-clock second."""
    from ..job import run_golden
    from ..matmul import matmul_job, matmul_output
    from ..sim.runner import simulate

    jobs, plans, expected = [], [], []
    for m, k, n in shapes:
        a, w = gemm_operands(m, k, n)
        job, plan = matmul_job(config, a, w)
        jobs += [job] * repeat
        plans.append(plan)
        expected.append(a @ w)
    results = simulate(jobs, simulator=simulator)
    records = []
    for index, (shape, plan) in enumerate(zip(shapes, plans, strict=True)):
        runs = results[index * repeat:(index + 1) * repeat]
        first = runs[0]
        cycles = first.counters.cycles
        records.append({
            "m": shape[0], "k": shape[1], "n": shape[2], "rows": config.rows,
            "cols": config.cols, "requant_lanes": config.requant_lanes,
            "simulator": simulator, "cycles": cycles,
            "model_cycles": run_golden(jobs[index * repeat]).counters.cycles,
            "ideal_cycles": plan.ideal_cycles, "utilization": round(plan.ideal_cycles / cycles, 4),
            "folds": plan.k_tiles * plan.n_tiles,
            "bit_exact": all(np.array_equal(matmul_output(plan, r), expected[index])
                             for r in runs),
            "repeat": repeat, "run_seconds": sum(r.run_seconds for r in runs),
            "cycles_per_second": round(cycles * repeat / max(sum(r.run_seconds for r in runs),
                                                             1e-9)),
        })
    return records


def run_gemm(*, quick: bool, progress: Callable[[str], None], recorded_dir: Path
             ) -> dict[str, Any]:
    """Section ``gemm``: each shape of :data:`SHAPES` on each array of :data:`ARRAYS`
    (``quick``: :data:`QUICK_SHAPES` on the first :data:`QUICK_ARRAYS` arrays), on the RTL
    in Verilator and in SCALE-Sim (weight stationary). Per shape: the RTL's cycles beside
    the cycle model's and SCALE-Sim's, and whether Y is bit-exact; shapes that do not fit
    an array are listed under ``skipped`` with the reason. ``recorded_dir`` is not used.

    Raises :class:`~npugen.sim.common.SimulationError` if Verilator cannot build or run,
    and SCALE-Sim's errors (:class:`~npugen.bench.scalesim.ScaleSimUnavailable`,
    :class:`~npugen.bench.scalesim.ScaleSimError`, both ``RuntimeError``)."""
    from ..matmul import matmul_job
    from ..schedule import DoesNotFit
    from .scalesim import closed_form_cycles, scalesim_gemm_cycles

    arrays = ARRAYS[:QUICK_ARRAYS] if quick else ARRAYS
    records, skipped = [], []
    for rows, cols in arrays:
        config = bench_config(rows, cols)
        shapes = []

        for shape in QUICK_SHAPES if quick else SHAPES:
            try:
                matmul_job(config, *gemm_operands(*shape))
                shapes.append(shape)
            except DoesNotFit as error:
                skipped.append({"rows": rows, "cols": cols, "shape": shape,
                                "reason": str(error)})
        progress(f"gemm: {rows}x{cols}, {len(shapes)} shapes on Verilator and SCALE-Sim")
        ours = run_on_rtl(config, shapes, "verilator")
        reference = scalesim_gemm_cycles(shapes, rows, cols, dataflow="ws")
        for record, theirs in zip(ours, reference, strict=True):
            # SCALE-Sim prints the last cycle's index: "cycles" is the count.
            record["scalesim_cycles"] = theirs["cycles"]
            record["scalesim_printed_total_cycles"] = theirs["total_cycles"]
            record["scalesim_stall_cycles"] = theirs["stall_cycles"]
            record["scalesim_formula_cycles"] = closed_form_cycles(
                record["m"], record["k"], record["n"], rows, cols, "ws")
            record["scalesim_utilization"] = round(record["ideal_cycles"] / theirs["cycles"], 4)
            record["ratio_to_scalesim"] = round(record["cycles"] / theirs["cycles"], 4)
            record["scalesim_version"] = theirs["scalesim_version"]
            records.append(record)
    return {"records": records, "skipped": skipped,
            "all_bit_exact": all(r["bit_exact"] for r in records),
            "all_cycles_equal_model": all(r["cycles"] == r["model_cycles"] for r in records)}


def run_simspeed(*, quick: bool, progress: Callable[[str], None], recorded_dir: Path
                 ) -> dict[str, Any]:
    """Section ``simspeed``: the :data:`SPEED_WORKLOAD` GEMM on 4×4 and 8×8 arrays
    (``quick``: 4×4) in each simulator that is available (Verilator, Icarus, Amaranth's);
    per run its build time and simulated cycles per wall-clock second (Verilator repeats
    the GEMM 20 times, 5 with ``quick``). Simulators not found are listed under
    ``unavailable``. ``recorded_dir`` is not used.

    Raises :class:`~npugen.sim.common.SimulationError` if a build or a run fails."""
    from ..sim.runner import build, simulator_available

    records, missing = [], []
    for rows in (4,) if quick else (4, 8):
        config = bench_config(rows, rows)
        for simulator in ("verilator", "icarus", "amaranth"):
            if not simulator_available(simulator):
                missing.append(simulator)
                continue
            progress(f"simspeed: {rows}x{rows} on {simulator}")
            started = time.perf_counter()
            if simulator != "amaranth":
                build(config, simulator)
            build_seconds = time.perf_counter() - started
            # Verilator finishes the workload in milliseconds: repeat it for a steadier
            # timing (the rate is per run; each repetition is the same GEMM).
            repeat = (5 if quick else 20) if simulator == "verilator" else 1
            record = run_on_rtl(config, [SPEED_WORKLOAD], simulator, repeat)[0]
            record["build_seconds"] = round(build_seconds, 1)
            records.append(record)
    return {"workload": "x".join(map(str, SPEED_WORKLOAD)), "records": records,
            "unavailable": sorted(set(missing))}
