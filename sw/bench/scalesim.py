"""SCALE-Sim's own cycle counts for GEMMs, to put beside the RTL's in benchmarks.

SCALE-Sim (PyPI ``scalesim`` 3.0.0) fails with NumPy 2.4, which npugen's environment has, so
it runs in an environment of its own (:func:`scalesim_python`) as a subprocess.

Naming: ours is ``A (M×K) @ W (K×N) = (M×N)``. SCALE-Sim's GEMM topology rows are
``name, M, N, K,`` and it reads them as an ifmap of M rows × K and N filters of K weights, so
our M, N, K go into its columns as they are, no swap. Under weight stationary it then holds a
K×N tile of W in the R×C array (K along the rows, N along the columns) and streams the M rows
of A, which is our mapping. That matches its cycle model, ``folds·(2R + C + M − 2)`` with
``folds = ⌈K/R⌉·⌈N/C⌉``; for output stationary it is ``⌈M/R⌉·⌈N/C⌉·(R + C + K − 2)``.

Off by one: COMPUTE_REPORT.csv's "Total Cycles" is the index (from 0) of the last cycle,
i.e. the cycle count less one. Each result gives both: ``total_cycles`` (SCALE-Sim's number
as printed) and ``cycles`` (= ``total_cycles + 1``, the count, which equals the formula).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..sim.runner import default_build_root

__all__ = ["SCALESIM_REQUIREMENTS", "ScaleSimUnavailable", "ScaleSimError", "scalesim_python",
           "scalesim_gemm_cycles", "closed_form_cycles"]

SCALESIM_REQUIREMENTS = ("scalesim==3.0.0", "numpy<2.4")
DATAFLOWS = ("ws", "os")
_RUN_NAME = "npugen"

# The configuration for every run. Why these settings (so compute alone sets the cycles):
# - InterfaceBandwidth = CALC is SCALE-Sim's "estimate bandwidth" mode: its ifmap and filter
#   read buffers are then stall-free (every read hits; the DRAM bandwidth needed is estimated,
#   not imposed), and the ofmap buffer drains ArrayWidth words a cycle, as many as the array
#   can write, so no memory stall enters "Total Cycles" (we return "Stall Cycles" to show it).
# - 4096 kB for each SRAM (SCALE-Sim counts 1-byte words), far more than any operand we
#   benchmark (256×256 is 64 kB), so no buffer refills mid-layer; the cycles were the same with
#   64 kB ones, but the simulation was faster with the large ones (14 s vs 19 s, 256³ on 8×8).
# - No [network_presets] section (the topology comes as an argument), and the custom-layout
#   and sparsity features are off. The offsets only separate the three address ranges.
_CONFIG = """\
[general]
run_name = {run_name}

[architecture_presets]
ArrayHeight = {rows}
ArrayWidth = {cols}
IfmapSramSzkB = 4096
FilterSramSzkB = 4096
OfmapSramSzkB = 4096
IfmapOffset = 0
FilterOffset = 100000000
OfmapOffset = 200000000
Dataflow = {dataflow}
ReadRequestBuffer = 32
WriteRequestBuffer = 32

[layout]
IfmapCustomLayout = False
FilterCustomLayout = False
IfmapSRAMBankBandwidth = 10
IfmapSRAMBankNum = 10
IfmapSRAMBankPort = 2
FilterSRAMBankBandwidth = 10
FilterSRAMBankNum = 10
FilterSRAMBankPort = 2

[run_presets]
InterfaceBandwidth = CALC
UseRamulatorTrace = False

[sparsity]
SparsitySupport = false
"""
# Cached results are only valid for this configuration: its digest is part of the cache key.
_CONFIG_TAG = hashlib.sha256(_CONFIG.encode()).hexdigest()[:12]

# Runs in SCALE-Sim's environment. The API (not its scale.py, whose -s flag is ignored)
# honours save_disk_space=True, so no traces are written; only the reports.
_CHILD = """\
import sys
from scalesim.scale_sim import scalesim
config, topology, layout, out = sys.argv[1:5]
sim = scalesim(save_disk_space=True, verbose=False, config=config, topology=topology,
               layout=layout, input_type_gemm=True)
sim.run_scale(top_path=out)
"""


class ScaleSimUnavailable(RuntimeError):
    """SCALE-Sim's environment could not be found or created."""


class ScaleSimError(RuntimeError):
    """SCALE-Sim ran but gave no usable report."""


def _venv_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _pointer_hint() -> str:
    reqs = " ".join(repr(r) for r in SCALESIM_REQUIREMENTS)
    return ("To use an existing environment instead, create one with `python3 -m venv ENV && "
            f"ENV/bin/pip install {reqs}` and set NPUGEN_SCALESIM_PYTHON=ENV/bin/python.")


def scalesim_python() -> Path:
    """The Python of SCALE-Sim's environment: ``$NPUGEN_SCALESIM_PYTHON``, or else
    ``<build root>/scalesim-env``, created on first use (safe when two processes race:
    each builds in its own temporary folder and the first to rename it into place wins)."""
    given = os.environ.get("NPUGEN_SCALESIM_PYTHON")
    if given:
        python = Path(given)
        if not python.exists():
            raise ScaleSimUnavailable(
                f"NPUGEN_SCALESIM_PYTHON={given} does not exist; point it at the Python of an "
                "environment with scalesim installed, or unset it to let npugen create one.")
        return python
    root = default_build_root()
    env = root / "scalesim-env"
    if _venv_python(env).exists():
        return _venv_python(env)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".scalesim-env-", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; the environment is not
    reqs = " ".join(repr(r) for r in SCALESIM_REQUIREMENTS)
    print(f"npugen: creating SCALE-Sim's environment at {env} (python -m venv; pip install "
          f"{reqs}): scalesim 3.0.0 fails with NumPy 2.4, so it gets its own NumPy",
          file=sys.stderr, flush=True)
    python = _venv_python(staging)
    steps = [
        [sys.executable, "-m", "venv", str(staging)],
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         *SCALESIM_REQUIREMENTS],
        [str(python), "-c", "import scalesim.scale_sim"],
    ]
    try:
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise ScaleSimUnavailable(
                    f"Creating SCALE-Sim's environment failed at `{' '.join(cmd)}` "
                    f"(exit {done.returncode}):\n{_tail(done.stdout + done.stderr)}\n"
                    + _pointer_hint())
        try:
            # Only bin/python is used, which works from the renamed folder (pip's scripts,
            # whose first line names the staging path, are never run).
            staging.rename(env)
        except OSError:
            if not _venv_python(env).exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a rename
    return _venv_python(env)


@functools.cache
def _scalesim_version(python: Path) -> str:
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('scalesim'))"],
        capture_output=True, text=True)
    if done.returncode != 0:
        raise ScaleSimUnavailable(
            f"scalesim is not installed for {python}:\n{_tail(done.stderr, 5)}\n"
            + _pointer_hint())
    return done.stdout.strip()


def closed_form_cycles(m: int, k: int, n: int, rows: int, cols: int,
                       dataflow: str = "ws") -> int:
    """SCALE-Sim's cycle model (the count, i.e. its "Total Cycles" + 1) for ``A(M×K) @ W(K×N)``
    on ``rows``×``cols``: WS ``⌈K/R⌉⌈N/C⌉·(2R + C + M − 2)``, OS ``⌈M/R⌉⌈N/C⌉·(R + C + K − 2)``."""
    if dataflow == "ws":
        return math.ceil(k / rows) * math.ceil(n / cols) * (2 * rows + cols + m - 2)
    if dataflow == "os":
        return math.ceil(m / rows) * math.ceil(n / cols) * (rows + cols + k - 2)
    raise ValueError(f"dataflow must be one of {DATAFLOWS}, not {dataflow!r}")


def _cache_path() -> Path:
    return default_build_root() / "scalesim-cache.json"


def _cache_key(version: str, rows: int, cols: int, dataflow: str,
               shape: tuple[int, int, int]) -> str:
    m, k, n = shape
    return f"scalesim={version}|{rows}x{cols}|{dataflow}|m={m},k={k},n={n}|cfg={_CONFIG_TAG}"


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: it is only a cache


def _write_cache(path: Path, new: dict) -> None:
    # Merge with what is on disk now and replace atomically; two writers at once can lose
    # each other's new entries (they are recomputed next time), never corrupt the file.
    merged = {**_read_cache(path), **new}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".scalesim-cache-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(merged, f, indent=1)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is not
    os.replace(tmp, path)


def _run(python: Path, shapes: list[tuple[int, int, int]], rows: int, cols: int,
         dataflow: str) -> list[dict]:
    """One SCALE-Sim run over all ``shapes`` in a temporary folder; its report rows, in order."""
    with tempfile.TemporaryDirectory(prefix="npugen-scalesim-") as tmp:
        work = Path(tmp)
        (work / "scale.cfg").write_text(
            _CONFIG.format(run_name=_RUN_NAME, rows=rows, cols=cols, dataflow=dataflow))
        # GEMM rows are `name, M, N, K,` (the trailing comma is required); names are unique.
        (work / "gemms.csv").write_text("Layer, M, N, K,\n" + "".join(
            f"gemm{i}_{m}x{k}x{n}, {m}, {n}, {k},\n" for i, (m, k, n) in enumerate(shapes)))
        (work / "layout.csv").write_text("Layer,\n")  # required, even with no custom layout
        done = subprocess.run(
            [str(python), "-c", _CHILD, "scale.cfg", "gemms.csv", "layout.csv", "out"],
            cwd=work, capture_output=True, text=True)
        report = work / "out" / _RUN_NAME / "COMPUTE_REPORT.csv"
        # SCALE-Sim exits 0 after some errors (it calls exit()), so look for the report too.
        if done.returncode != 0 or not report.exists():
            raise ScaleSimError(
                f"SCALE-Sim ({python}) failed (exit {done.returncode}, no {report.name}):\n"
                f"{_tail(done.stdout + done.stderr)}")
        with report.open(newline="") as f:
            table = [[cell.strip() for cell in row] for row in csv.reader(f) if row]
    header, body = table[0], table[1:]
    wanted = {"total_cycles_incl_prefetch": "Total Cycles (incl. prefetch)",
              "total_cycles": "Total Cycles", "stall_cycles": "Stall Cycles",
              "overall_util_pct": "Overall Util %",
              "mapping_efficiency_pct": "Mapping Efficiency %",
              "compute_util_pct": "Compute Util %"}
    missing = [name for name in wanted.values() if name not in header]
    if missing or len(body) != len(shapes):
        raise ScaleSimError(
            f"Unexpected {report.name} from SCALE-Sim: columns {header}, {len(body)} rows for "
            f"{len(shapes)} GEMMs (missing columns: {missing}). Use {SCALESIM_REQUIREMENTS[0]}.")
    rows_out = []
    for row in body:
        cells = {key: row[header.index(name)] for key, name in wanted.items()}
        rows_out.append({key: (float(v) if key.endswith("_pct") else int(float(v)))
                         for key, v in cells.items()})
    return rows_out


def scalesim_gemm_cycles(shapes: list[tuple[int, int, int]], rows: int, cols: int,
                         dataflow: str = "ws", *, cache: bool = True) -> list[dict]:
    """SCALE-Sim's cycles for each GEMM ``(m, k, n)`` (``A(m×k) @ W(k×n)``) on a
    ``rows``×``cols`` array, ``dataflow`` "ws" or "os"; one SCALE-Sim run for all shapes not
    in ``<build root>/scalesim-cache.json`` (``cache=False`` neither reads nor writes it).

    Each result: m, k, n, rows, cols, dataflow, total_cycles (COMPUTE_REPORT.csv's "Total
    Cycles", which is the last cycle's index), cycles (= total_cycles + 1: the cycle count,
    which :func:`closed_form_cycles` gives), stall_cycles, overall_util_pct,
    mapping_efficiency_pct, compute_util_pct, total_cycles_incl_prefetch (with its DRAM
    prefetch estimate), scalesim_version. SCALE-Sim is slow: ~14 s for 256×256×256 on 8×8.
    """
    if dataflow not in DATAFLOWS:
        raise ValueError(f"dataflow must be one of {DATAFLOWS}, not {dataflow!r}")
    if rows < 1 or cols < 1:
        raise ValueError(f"array must be at least 1x1, not {rows}x{cols}")
    shapes = [tuple(int(d) for d in s) for s in shapes]
    for s in shapes:
        if len(s) != 3 or min(s) < 1:
            raise ValueError(f"each shape must be (m, k, n) of positive integers, not {s}")
    # The environment npugen creates has the pinned version: a fully cached request needs
    # no environment at all (no network on a machine that has the cache).
    pinned = SCALESIM_REQUIREMENTS[0].split("==")[1]
    python = scalesim_python() if os.environ.get("NPUGEN_SCALESIM_PYTHON") else None
    version = _scalesim_version(python) if python else pinned
    keys = [_cache_key(version, rows, cols, dataflow, s) for s in shapes]
    known = _read_cache(_cache_path()) if cache else {}
    todo = list(dict.fromkeys(s for s, key in zip(shapes, keys, strict=True)
                              if key not in known))
    if todo:
        python = python or scalesim_python()
        # Measured: 20k-35k simulated cycles a second (256x256x256 on 8x8: 284,672 in 14 s).
        guess = sum(closed_form_cycles(*s, rows, cols, dataflow) for s in todo) / 25_000
        print(f"npugen: running SCALE-Sim {version} on {len(todo)} GEMM shape(s), {rows}x{cols} "
              f"{dataflow}, not cached (SCALE-Sim is slow: about {max(guess, 1):.0f} s)",
              file=sys.stderr, flush=True)
        new = {}
        for (m, k, n), report in zip(todo, _run(python, todo, rows, cols, dataflow),
                                     strict=True):
            new[_cache_key(version, rows, cols, dataflow, (m, k, n))] = {
                "m": m, "k": k, "n": n, "rows": rows, "cols": cols, "dataflow": dataflow,
                **report, "cycles": report["total_cycles"] + 1, "scalesim_version": version}
        known.update(new)
        if cache:
            _write_cache(_cache_path(), new)
    return [dict(known[key]) for key in keys]
