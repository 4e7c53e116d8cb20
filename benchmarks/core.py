"""NPU-core benchmarks: GEMM utilization on the RTL against SCALE-Sim's weight-stationary
model, and simulation speed of the free-running testbench.

    python benchmarks/core.py [--quick] [--json]

Prints a Markdown table (the figures in docs/BENCHMARKS.md come from it) and, with
--json, one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from npugen.config import NpuConfig
from npugen.job import run_golden
from npugen.matmul import matmul_job, matmul_output
from npugen.sim.runner import simulate, simulator_available


def big_config(rows: int, cols: int) -> NpuConfig:
    return NpuConfig(rows=rows, cols=cols, activation_depth=16384, weight_depth=16384,
                     accumulator_depth=16384, instruction_depth=8192)


def scalesim_ws_cycles(config: NpuConfig, m: int, k: int, n: int) -> int:
    """SCALE-Sim's weight-stationary model: 2R + C + T − 2 cycles for each of
    ⌈K/R⌉·⌈N/C⌉ folds, with T = M."""
    r, c = config.rows, config.cols
    folds = -(-k // r) * -(-n // c)
    return folds * (2 * r + c + m - 2)


def gemm_record(config: NpuConfig, m: int, k: int, n: int, simulator: str) -> dict:
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (m, k))
    w = rng.integers(-128, 128, (k, n))
    job, plan = matmul_job(config, a, w)
    golden = run_golden(job)
    started = time.perf_counter()
    result = simulate([job], simulator=simulator)[0]
    seconds = time.perf_counter() - started
    folds = plan.k_tiles * plan.n_tiles
    scalesim = scalesim_ws_cycles(config, m, k, n)
    cycles = result.counters.cycles
    return {
        "workload": f"GEMM {m}x{k}x{n}",
        "array": f"{config.rows}x{config.cols}, {config.requant_lanes} lane(s)",
        "simulator": simulator, "cycles": cycles, "model_cycles": golden.counters.cycles,
        "ideal_cycles": plan.ideal_cycles, "utilization": plan.ideal_cycles / cycles,
        "scalesim_ws_cycles": scalesim, "scalesim_utilization": plan.ideal_cycles / scalesim,
        "folds": folds, "overhead_per_fold": (cycles - m * folds) / folds,
        "scalesim_overhead_per_fold": (scalesim - m * folds) / folds,
        "bit_exact": bool(np.array_equal(matmul_output(plan, result), a @ w)),
        "run_cycles_per_second": cycles / result.run_seconds,
        "wall_seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    simulators = [s for s in ("verilator", "icarus") if simulator_available(s)]
    records = []
    size = 128 if args.quick else 256
    records.append(gemm_record(big_config(8, 8), size, size, size, "verilator"))
    # Simulation speed: the same free-running GEMM on each simulator and array size.
    for rows in (4, 8):
        for simulator in simulators:
            m = 512 if simulator == "verilator" else 64
            records.append(gemm_record(big_config(rows, rows), m, 64, 64, simulator))
    # The same 4x4 with one requantization lane: less logic for the simulator to evaluate.
    one_lane = big_config(4, 4).replace(requant_lanes=1)
    records.append(gemm_record(one_lane, 512, 64, 64, "verilator"))
    print("| workload | array | simulator | cycles | model | ideal | utilization "
          "| SCALE-Sim WS | overhead/fold (ours, SCALE-Sim) | sim cycles/s | bit-exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['workload']} | {r['array']} | {r['simulator']} | {r['cycles']} | "
              f"{r['model_cycles']} | {r['ideal_cycles']:.0f} | {r['utilization']:.4f} | "
              f"{r['scalesim_ws_cycles']} ({r['scalesim_utilization']:.4f}) | "
              f"{r['overhead_per_fold']:.3f}, {r['scalesim_overhead_per_fold']:.0f} | "
              f"{r['run_cycles_per_second']:,.0f} | {r['bit_exact']} |")
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
                          "processor": platform.processor(), "records": records}))


if __name__ == "__main__":
    main()
