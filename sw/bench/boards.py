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
def _root() -> Path:
    from ..paths import project_root

    return project_root()


def sweep_grid() -> Path:
    """The grid of the ``sweep`` section: ``benchmarks/sweep.toml`` of the checkout."""
    return _root() / "benchmarks" / "sweep.toml"


def point_cache() -> Path:
    """Shared by the board builds and the sweep: the same point is built once."""
    return _root() / "build" / "sweep" / "points"


def _recorded(name: str, recorded_dir: Path) -> dict[str, Any]:
    path = recorded_dir / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no recorded {path} for --quick: give --recorded DIR, or "
                                f"measure it with npugen bench --only {name}")
    saved = json.loads(path.read_text())
    origin = saved.get("recorded_from") or {k: saved.get(k) for k in ("command", "date",
                                                                      "machine", "revision")}
    wrapper = ("section", "command", "quick", "date", "machine", "revision", "seconds",
               "recorded_from")
    return {**{k: v for k, v in saved.items() if k not in wrapper}, "recorded_from": origin}


def _sweep_records(points, out: Path, progress: Callable[[str], None]) -> list[dict]:
    from ..sweep import run_sweep

    records = run_sweep(points, out, jobs=os.cpu_count(), cache_dir=point_cache(),
                        progress=progress)
    return [{k: v for k, v in r.items() if k != "cached"} for r in records]


def run_boards(*, quick: bool, progress: Callable[[str], None], recorded_dir: Path,
               boards: list[str] | None = None) -> dict[str, Any]:
    """Section ``boards``: each board's default config built with yosys/nextpnr (seed 1,
    the yowasp tools, builds cached under :func:`point_cache`) and :data:`WORKLOAD` timed
    by the cycle model; returns one sweep record per board (``records``) and ``workload``.
    ``boards`` builds those boards only (:func:`merge_board_records` keeps the others').

    With ``quick``, the recorded ``boards.json`` of ``recorded_dir`` instead, its origin
    under ``recorded_from``; ``FileNotFoundError`` if there is none. ``progress`` gets
    the sweep's lines."""
    if quick:
        return _recorded("boards", recorded_dir)
    from ..boards import BOARDS
    from ..sweep import SweepPoint, design_digest

    design = design_digest()
    points = [SweepPoint(board.name, board.default_config, 1, WORKLOAD, "yowasp", design)
              for board in BOARDS.values() if boards is None or board.name in boards]
    return {"records": _sweep_records(points, _root() / "build" / "bench-boards", progress),
            "workload": "x".join(map(str, WORKLOAD))}


def merge_board_records(recorded: dict[str, Any], rebuilt: dict[str, Any]) -> dict[str, Any]:
    """The boards section after ``rebuilt`` (a run of some boards only) over ``recorded``
    (the last whole run, with its own updates): the recorded origin (command, revision,
    date) stays, the rebuilt boards' records replace theirs, and ``updated`` says which
    records come from which run, for the report."""
    new = {r["board"]: r for r in rebuilt["records"]}
    records = [new.pop(r["board"], r) for r in recorded["records"]] + list(new.values())
    names = {r["board"] for r in rebuilt["records"]}
    updated = [u for u in recorded.get("updated") or [] if u["board"] not in names]
    updated += [{"board": name, **{key: rebuilt[key] for key in (
        "revision", "date", "command", "seconds", "machine")}} for name in sorted(names)]
    return {**recorded, "records": records, "updated": updated}


def run_sweep(*, quick: bool, progress: Callable[[str], None], recorded_dir: Path
              ) -> dict[str, Any]:
    """Section ``sweep``: every point of :func:`sweep_grid` built and timed
    (:func:`npugen.sweep.run_sweep`, points cached under :func:`point_cache`); returns the
    grid's text and the records. A missing or bad grid raises
    :class:`~npugen.sweep.SweepError` (a ``ValueError``) before any build.

    With ``quick``, the recorded ``sweep.json`` of ``recorded_dir`` instead, as
    :func:`run_boards` does."""
    if quick:
        return _recorded("sweep", recorded_dir)
    from ..sweep import load_grid

    grid = sweep_grid()
    points = load_grid(grid)  # a missing or bad grid fails here, before any build
    return {"grid": "benchmarks/sweep.toml", "grid_text": grid.read_text(),
            "records": _sweep_records(points, _root() / "build" / "sweep", progress)}
