"""``npugen bench``: the project's measurements, written to ``benchmarks/results/*.json``
and to ``docs/BENCHMARKS.md`` (tables and PNG plots).

Each section is a function ``run_<section>(*, quick, progress, recorded_dir) -> dict`` in a
module of this package;
:func:`run_bench` runs the chosen sections, saves one JSON file each (with the command,
date and machine), and regenerates the document from every saved section, so running
one section (``--only``) updates its part and keeps the others.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SECTIONS", "run_bench", "machine", "load_results", "BenchError",
           "recorded_boards"]


class BenchError(RuntimeError):
    """A section could not measure (a tool missing, a simulation failing): the message
    names the section."""



#: Section name → (module, what it measures).
SECTIONS: dict[str, tuple[str, str]] = {
    "gemm": ("gemm", "GEMM cycles on the RTL beside SCALE-Sim, for a grid of shapes and arrays"),
    "simspeed": ("gemm", "simulation speed: Verilator, Icarus, Amaranth's simulator"),
    # Before e2e, which reports latency at each board's Fmax.
    "boards": ("boards", "each board's default config: resources, Fmax, GMAC/s"),
    "sweep": ("boards", "the design-space sweep of benchmarks/sweep.toml (Pareto plot)"),
    "e2e": ("models", "the demo MLP and CNN end to end, latency at each board's Fmax"),
    # After boards, like e2e: latency at each board's clock beside its recorded Fmax.
    "mlperf": ("mlperf", "the four MLPerf Tiny models on each board's default NPU"),
    "cnn": ("models", "convolution operators on the RTL"),
    "compile": ("models", "compile time of a 784-128-10 MLP"),
    "link": ("link", "host link upload throughput against the line rate"),
}


def machine() -> dict[str, Any]:
    """The machine a measurement ran on."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "arch": platform.machine(),
            "python": platform.python_version(), "system": platform.system()}


def source_revision() -> str | None:
    """The git commit the measurement ran on (``+dirty`` with uncommitted changes)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every saved section under ``results_dir``, by name."""
    found = {}
    for name in SECTIONS:
        path = results_dir / f"{name}.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
    return found


def recorded_boards(path: Path) -> dict[str, Any]:
    """The recorded boards section a run of some boards keeps the others' records from;
    ``ValueError`` naming the file if it has none."""
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON ({error}): run the whole boards section "
                         f"(without --boards) to record every board") from None
    if not (isinstance(recorded, dict) and isinstance(recorded.get("records"), list)):
        raise ValueError(f"{path} has no board records: run the whole boards section "
                         f"(without --boards) to record every board")
    return recorded


def run_bench(*, quick: bool, sections: list[str] | None = None,
              results_dir: str | Path = "benchmarks/results",
              docs_path: str | Path | None = "docs/BENCHMARKS.md",
              recorded_dir: str | Path = "benchmarks/results", command: str | None = None,
              boards: list[str] | None = None,
              progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Run ``sections`` (default: all), save their JSON, regenerate ``docs_path``; return
    ``{section: result}``. ``recorded_dir`` holds the recorded board builds and sweep
    that ``--quick`` reports instead of rebuilding; ``boards`` limits the boards
    section's builds to those boards, the others' records kept from ``recorded_dir``."""
    import importlib

    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    chosen = sections or list(SECTIONS)
    command = command or "npugen bench" + (" --quick" * quick) + (
        f" --only {','.join(sections)}" if sections else "")
    results: dict[str, Any] = {}
    # Taken before any section writes its results (tracked files): a clean tree is
    # recorded clean in every section, not "+dirty" after the first.
    revision = source_revision()
    chosen = [name for name in SECTIONS if name in chosen]
    if "sweep" in chosen and not quick:
        from ..sweep import load_grid
        from .boards import sweep_grid

        try:
            load_grid(sweep_grid())  # fail now, not after the board builds
        except ValueError as error:
            raise BenchError(f"section sweep: {error}") from None
    for name in chosen:
        # Boards just rebuilt here are the ones e2e's and mlperf's latencies use.
        recorded = results_dir if name in ("e2e", "mlperf") and "boards" in results \
            and not quick \
            else Path(recorded_dir)
        module = importlib.import_module(f".{SECTIONS[name][0]}", __name__)
        progress(f"{name}: {SECTIONS[name][1]}")
        started = time.perf_counter()
        some_boards = name == "boards" and boards is not None and not quick
        try:
            # Read first: a run of some boards that cannot keep the others' fails early.
            kept = recorded_boards(Path(recorded) / "boards.json") if some_boards else None
            body = getattr(module, f"run_{name}")(
                quick=quick, progress=progress, recorded_dir=recorded,
                **({"boards": boards} if some_boards else {}))
        except (OSError, ValueError, RuntimeError) as error:
            raise BenchError(f"section {name}: {type(error).__name__}: {error}") from error
        seconds = round(time.perf_counter() - started, 1)
        result = {"section": name, "command": command, "quick": quick,
                  "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                  "revision": revision, "seconds": seconds, **body}
        if kept is not None:
            from .boards import merge_board_records

            result = merge_board_records(kept, result)
        (results_dir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        results[name] = result
        progress(f"{name}: done in {seconds} s")
    if docs_path is not None:
        from .report import write_report

        write_report(load_results(results_dir), Path(docs_path))
        progress(f"wrote {docs_path} and its plots")
    return results
