"""MLPerf Tiny: the four closed-division reference models (int8 TFLite, in
``benchmarks/models/mlperf-tiny/``) on each board's default NPU and on a reference 8×8
with memories large enough for all four. Cycles and utilization from the golden model's
counters, latency at the board's clock beside the array's physical limit, outputs
compared with LiteRT's reference kernels, and one run per model on the virtual board."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..mlperf import MODELS, REFERENCE_CONFIG, model_folder, model_path
from ..program import UNIT_KEYS
from ..protocol import UART_BITS_PER_BYTE
from ..tflite_kernels import litert_reference
from .models import board_fmax, recorded_build, short_config

REFERENCE_NAME = "reference 8×8"
#: The board whose clock the reference 8×8 is reported at, and whose default NPU the
#: per-layer tables show (the reference 8×8 where a model does not fit it).
REFERENCE_BOARD = "ulx3s-85f"

#: Random inputs per model and config on the golden model (rounded up to a whole batch);
#: the virtual board runs VIRTUAL_BOARD_INPUTS of them.
INPUTS = {True: 1, False: 4}
VIRTUAL_BOARD_INPUTS = 2


def published_latencies(readme: Path) -> dict[str, dict[str, float | None]]:
    """The published latencies (ms) of the models' README table ``| system | AD | IC |
    KWS | VWW |``: system → model key → ms (None for ``–``)."""
    lines = readme.read_text().splitlines()
    header = next((i for i, line in enumerate(lines)
                   if line.replace(" ", "").lower() == "|system|ad|ic|kws|vww|"), None)
    if header is None:
        raise ValueError(f"{readme} has no '| system | AD | IC | KWS | VWW |' table of "
                         f"published latencies")
    keys = [cell.strip().lower() for cell in lines[header].strip("|").split("|")][1:]
    table: dict[str, dict[str, float | None]] = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        system, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[system] = {key: None if cell in ("–", "-", "") else float(cell)
                         for key, cell in zip(keys, cells, strict=True)}
    return table


def bench_targets(recorded_dir: Path) -> list[dict[str, Any]]:
    """One entry per target: each board's default NPU, then the reference 8×8, with the
    clock (MHz) its latency is given at and the recorded Fmax of the same config."""
    from ..boards import BOARDS, soc_clock_hz

    builds = board_fmax(recorded_dir)
    found = []
    for board in BOARDS.values():
        config = board.default_config
        entry: dict[str, Any] = {"name": board.name, "board": board.name, "config": config,
                                 "clock_mhz": soc_clock_hz(board) / 1e6, "baud": board.baud}
        build, differs = recorded_build(board, builds)
        if build:
            entry["fmax_mhz"] = build["fmax_mhz"]
            if differs:
                entry["fmax_build_differs"] = differs
        found.append(entry)
    found.append({"name": REFERENCE_NAME, "board": None, "config": REFERENCE_CONFIG,
                  "clock_mhz": soc_clock_hz(BOARDS[REFERENCE_BOARD]) / 1e6,
                  "baud": BOARDS[REFERENCE_BOARD].baud})
    return found


def _ms(cycles: float, mhz: float) -> float:
    return round(cycles / (mhz * 1e3), 4)


def _layers(program) -> list[dict[str, Any]]:
    """Per-layer figures (programs compiled before dense chains had per-layer cycles
    have none)."""
    rows = []
    for layer in program.layers:
        kind = layer.get("kind") or ("dense" if "in_features" in layer else "?")
        rows.append({"name": layer["name"], "kind": kind, "macs": layer["macs"],
                     "cycles": layer.get("cycles"), "utilization": layer.get("utilization"),
                     **{key: layer.get(key) for key in UNIT_KEYS}})
    return rows


def link_ms(program, baud: int) -> float:
    """Milliseconds per inference (a whole batch a run) that the host link takes, at
    least, to write a program's stages (0 for a program not in stages): their WRITE
    requests' bytes at ``baud``, 8N1."""
    seconds = program.stage_upload_bytes() * UART_BITS_PER_BYTE / baud
    return round(seconds * 1e3 / program.batch, 4)


def _measure(program, x: np.ndarray, reference: np.ndarray | None, clock_mhz: float,
             baud: int) -> dict[str, Any]:
    """Run ``x`` on the golden model: cycles per inference from its counters, outputs
    against ``reference`` (None: not checked). A program in stages: its latency adds
    the link's time to write the stages (:func:`link_ms`)."""
    from ..runtime import run

    result = run(program, x, target="golden")
    config = program.config
    cycles = result.counters.cycles / result.inferences
    link = link_ms(program, baud)
    entry: dict[str, Any] = {
        "batch": program.batch, "inputs": result.inferences,
        "cycles_per_inference": cycles,
        "cycles_equal_model": result.counters.cycles == program.estimated_cycles * result.runs,
        "utilization": round(program.macs_per_inference / (cycles * config.rows * config.cols),
                             4),
        "stages": len(program.images()), "link_ms": link,
        "latency_ms": round(_ms(cycles, clock_mhz) + link, 4),
        "bit_exact": None if reference is None else bool(
            np.array_equal(result.quantized_output, reference[:len(x)])),
        "layers": _layers(program), **_unit_work(program)}
    return entry


def _unit_work(program) -> dict[str, Any]:
    """The array's, the requantizer's and (on an NPU with them) the rescale tables' work
    per inference, and the utilization if the array never waited
    (:meth:`Program.unit_work`)."""
    work = program.unit_work()
    if not work:
        return {}
    return {"array_cycles_per_inference": work["array_cycles"] / program.batch,
            "requant_cycles_per_inference": work["requant_cycles"] / program.batch,
            **({"table_cycles_per_inference": work["table_cycles"] / program.batch}
               if "table_cycles" in work else {}),
            "array_bound_utilization": work["array_bound_utilization"]}


def _virtual_board(program, x: np.ndarray, reference: np.ndarray | None, where: str,
                   progress: Callable[[str], None]) -> dict[str, Any]:
    """``x`` on the virtual board (the SoC in Verilator, through its UART): outputs against
    LiteRT and the board's cycle counters against the golden model's."""
    from ..runtime import run

    progress(f"mlperf: {len(x)} inputs on the virtual board ({where}, "
             f"{short_config(program.config)}): builds the SoC, minutes")
    record: dict[str, Any] = {"on": where, "config": short_config(program.config),
                              "inputs": len(x)}
    started = time.perf_counter()
    try:
        board = run(program, x, target="sim")
    except (OSError, RuntimeError, ValueError) as error:
        record["error"] = f"{type(error).__name__}: {error}"
        return record
    golden = run(program, x, target="golden")
    record.update(
        seconds=round(time.perf_counter() - started, 1), runs=board.runs,
        cycles=board.counters.cycles, golden_cycles=golden.counters.cycles,
        cycles_equal_golden=board.counters == golden.counters,
        bit_exact=None if reference is None else bool(
            np.array_equal(board.quantized_output, reference[:len(x)])),
        equal_golden=bool(np.array_equal(board.quantized_output, golden.quantized_output)))
    return record


def model_record(key: str, quick: bool, targets: list[dict[str, Any]],
                 progress: Callable[[str], None]) -> dict[str, Any]:
    """Model ``key`` of :data:`MODELS` on every one of ``targets`` (from
    :func:`bench_targets`): fits or why not, cycles, utilization, latency against the
    physical limit, bit-exactness; per-layer figures; the virtual board's run unless
    ``quick``.
    Raises ``ValueError`` if the model does not compile for the reference 8×8."""
    from ..compiler import compile_model

    file, task = MODELS[key].file, MODELS[key].task
    path = model_path(key)
    programs: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    for target in targets:
        try:
            programs[target["name"]] = compile_model(path, target["config"])
        except ValueError as error:  # DoesNotFit names the memory and the need
            reasons[target["name"]] = str(error)
    if REFERENCE_NAME not in programs:
        raise ValueError(f"MLPerf Tiny {key} does not compile for the {REFERENCE_NAME} "
                         f"({REFERENCE_CONFIG.describe()}): {reasons[REFERENCE_NAME]}")
    macs = programs[REFERENCE_NAME].macs_per_inference
    # The same seeded inputs on every target, a whole batch on each.
    count = INPUTS[quick]
    needed = max(-(-count // p.batch) * p.batch for p in programs.values())
    shape = programs[REFERENCE_NAME].input.shape
    x = np.random.default_rng(sorted(MODELS).index(key)).integers(
        -128, 128, (max(needed, VIRTUAL_BOARD_INPUTS), *shape), dtype=np.int8)
    reference_of = litert_reference(path)
    reference = None if reference_of is None else reference_of(x)
    record: dict[str, Any] = {
        "model": key, "file": file, "task": task, "macs": macs,
        "input_shape": list(shape),
        "reference": ("LiteRT BUILTIN_REF" if reference is not None
                      else "reference not checked (ai-edge-litert not installed)"),
        "targets": []}
    for target in targets:
        config, name = target["config"], target["name"]
        entry: dict[str, Any] = {
            "name": name, "board": target["board"], "config": short_config(config),
            "rows": config.rows, "cols": config.cols, "clock_mhz": target["clock_mhz"],
            "baud": target["baud"],
            "physical_limit_ms": _ms(macs / (config.rows * config.cols), target["clock_mhz"]),
            **{k: target[k] for k in ("fmax_mhz", "fmax_build_differs") if k in target}}
        if name in reasons:
            entry.update(fits=False, reason=reasons[name])
            record["targets"].append(entry)
            continue
        program = programs[name]
        progress(f"mlperf: {key} on {name} ({short_config(config)}), golden model")
        whole_batches = -(-count // program.batch) * program.batch
        entry.update(fits=True, **_measure(program, x[:whole_batches], reference,
                                           target["clock_mhz"], target["baud"]))
        if program.batch > 1:  # single-stream latency, as MLPerf Tiny measures it
            from ..runtime import run

            alone = compile_model(path, config, batch=1)
            single = run(alone, x[:1], target="golden")
            entry["batch1_cycles"] = single.counters.cycles
            entry["batch1_link_ms"] = link_ms(alone, target["baud"])
            entry["batch1_latency_ms"] = round(_ms(single.counters.cycles, target["clock_mhz"])
                                               + entry["batch1_link_ms"], 4)
        if "fmax_mhz" in entry:
            entry["latency_ms_at_fmax"] = round(
                _ms(entry["cycles_per_inference"], entry["fmax_mhz"]) + entry["link_ms"], 4)
        record["targets"].append(entry)
    # Per-layer figures: on the reference board's default NPU, else the reference 8×8.
    shown = next(t for t in record["targets"]
                 if t["fits"] and t["name"] in (REFERENCE_BOARD, REFERENCE_NAME))
    record["layers_on"] = shown["name"]
    record["layers"] = shown["layers"]
    for entry in record["targets"]:
        entry.pop("layers", None)
    if quick:
        record["virtual_board"] = {"skipped": "not run with --quick"}
    else:
        # A board's default NPU with feature maps where one holds the model (the SoC of a
        # real board), else the reference 8×8.
        where = next((t["name"] for t in targets if t["board"] and t["name"] in programs
                      and t["config"].feature_maps), REFERENCE_NAME)
        record["virtual_board"] = _virtual_board(
            programs[where], x[:VIRTUAL_BOARD_INPUTS], reference, where, progress)
    return record


def run_mlperf(*, quick: bool, progress: Callable[[str], None], recorded_dir: Path
               ) -> dict[str, Any]:
    """Section ``mlperf``: :func:`model_record` of each model of :data:`MODELS` on every
    target of :func:`bench_targets` (each board's default NPU, with its Fmax from
    ``recorded_dir``'s ``boards.json`` where there is one, then the reference 8×8), and
    the latencies published in the models' README. ``quick``: one input per model and no
    run on the virtual board.

    Raises ``ValueError`` if a model does not compile for the reference 8×8 (a missing
    model file included) or the README has no table of published latencies."""
    found = bench_targets(recorded_dir)
    boards_source = recorded_dir / "boards.json"
    return {"records": [model_record(key, quick, found, progress) for key in MODELS],
            "published_ms": published_latencies(model_folder() / "README.md"),
            "boards_source": str(boards_source) if boards_source.exists() else None,
            "reference_config": REFERENCE_CONFIG.to_dict(),
            "reference_clock_board": REFERENCE_BOARD}
