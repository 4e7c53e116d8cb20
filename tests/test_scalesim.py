"""SCALE-Sim, an independent tool, agrees with the closed-form weight-stationary cycle model."""

import math

from npugen.bench.scalesim import scalesim_gemm_cycles


def test_scalesim_ws_cycles_match_closed_form():
    rows = cols = 4
    shapes = [(10, 6, 9), (5, 9, 7)]  # (m, k, n): A(m×k) @ W(k×n); partial folds both ways
    results = scalesim_gemm_cycles(shapes, rows, cols, "ws", cache=False)  # may create its env
    for (m, k, n), r in zip(shapes, results, strict=True):
        # A K×N tile of W in the R×C array, the M rows of A streamed through it.
        expected = math.ceil(k / rows) * math.ceil(n / cols) * (2 * rows + cols + m - 2)
        assert (r["m"], r["k"], r["n"]) == (m, k, n)
        assert r["stall_cycles"] == 0
        assert r["cycles"] == expected, r
        assert r["total_cycles"] == expected - 1  # SCALE-Sim prints the last cycle's index
        assert r["scalesim_version"] == "3.0.0"
