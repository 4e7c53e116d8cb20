"""Board builds of each default config, and the design-space sweep, for the benchmark
report. Both are place-and-route runs (minutes each): ``--quick`` reports the recorded
results instead of rebuilding."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The GEMM whose cycles (cycle model) turn peak into achieved GMAC/s.
WORKLOAD = (256, 256, 256)
SWEEP_GRID = Path("benchmarks/sweep.toml")
#: Shared by the board builds and the sweep: the same point is built once.
POINT_CACHE = Path("build/sweep/points")


def _recorded(name: str, recorded_dir: Path) -> dict[str, Any]:
    path = recorded_dir / f"{name}.json"
    if not path.exists():
        return {"records": [], "missing": f"no recorded {path}: run npugen bench --only {name}"}
    saved = json.loads(path.read_text())
    origin = saved.get("recorded_from") or {k: saved.get(k) for k in ("command", "date",
                                                                      "machine", "revision")}
    return {"records": saved["records"], "recorded_from": origin}


def _sweep_records(points, out: Path, progress: Callable[[str], None]) -> list[dict]:
    from ..sweep import run_sweep

    records = run_sweep(points, out, jobs=os.cpu_count(), cache_dir=POINT_CACHE,
                        progress=progress)
    return [{k: v for k, v in r.items() if k != "cached"} for r in records]


def run_boards(*, quick: bool, progress: Callable[[str], None], recorded_dir: Path
               ) -> dict[str, Any]:
    if quick:
        return _recorded("boards", recorded_dir)
    from ..boards import BOARDS
    from ..sweep import SweepPoint, design_digest

    design = design_digest()
    points = [SweepPoint(board.name, board.default_config, 1, WORKLOAD, "yowasp", design)
              for board in BOARDS.values()]
    return {"records": _sweep_records(points, Path("build/bench-boards"), progress),
            "workload": "x".join(map(str, WORKLOAD))}


def run_sweep(*, quick: bool, progress: Callable[[str], None], recorded_dir: Path
              ) -> dict[str, Any]:
    if quick:
        return _recorded("sweep", recorded_dir)
    from ..sweep import load_grid

    return {"grid": str(SWEEP_GRID), "grid_text": SWEEP_GRID.read_text(),
            "records": _sweep_records(load_grid(SWEEP_GRID), Path("build/sweep"), progress)}
