"""Platform mapping of registered products.

The generic design multiplies with plain operators and lets yosys map the products to DSP
blocks. Where yosys cannot use a DSP block's own registers, the product is instantiated
by hand here, behind the same function, so the Verilog for simulation and for other flows
stays generic.
"""

from amaranth import ClockSignal, Const, Module, Signal, signed
from amaranth.hdl import Instance, Value

__all__ = ["ECP5_MULT_WIDTH", "PRIMITIVE_FAMILIES", "PrimitiveFamily", "registered_product",
           "simulation_models"]

#: Operand width of the ECP5 MULT18X18D.
ECP5_MULT_WIDTH = 18


class PrimitiveFamily:
    """Stands in for a board's platform when the design is elaborated for simulation with
    that family's hand-instantiated primitives (only ``family`` is read)."""

    def __init__(self, family: str):
        if family not in PRIMITIVE_FAMILIES:
            raise ValueError(f"primitives must be one of {', '.join(PRIMITIVE_FAMILIES)}, "
                             f"not {family!r}")
        self.family = family


def registered_product(m: Module, platform, a: Value, b: Value, *, name: str) -> Signal:
    """``a * b`` (both signed) one clock cycle later, in the ``sync`` domain, reset-less.

    On ECP5 (``platform.family == "ecp5"``) this is a MULT18X18D with its A and B input
    registers: the register sits in front of the multiplier inside the DSP block, so the
    multiplier's delay starts at the block instead of lying between fabric registers,
    and nextpnr times it as such (its ``MULT18X18D_REGS_INPUT`` timing). yosys maps plain
    operators only to a combinational MULT18X18D. Everywhere else: a plain registered
    product.
    """
    width = len(a) + len(b)
    product = Signal(signed(width), name=name, reset_less=True)
    if (getattr(platform, "family", None) != "ecp5"
            or max(len(a), len(b)) > ECP5_MULT_WIDTH):
        m.d.sync += product.eq(a * b)
        return product
    a18, b18 = Signal(signed(ECP5_MULT_WIDTH)), Signal(signed(ECP5_MULT_WIDTH))
    p36 = Signal(2 * ECP5_MULT_WIDTH)
    m.d.comb += [a18.eq(a), b18.eq(b), product.eq(p36[:width])]
    ports = {}
    for i in range(ECP5_MULT_WIDTH):
        ports[f"i_A{i}"] = a18[i]
        ports[f"i_B{i}"] = b18[i]
        ports[f"i_C{i}"] = Const(0, 1)
    for i in range(2 * ECP5_MULT_WIDTH):
        ports[f"o_P{i}"] = p36[i]
    m.submodules[f"{name}_mult18x18d"] = Instance(
        "MULT18X18D",
        p_REG_INPUTA_CLK="CLK0", p_REG_INPUTA_CE="CE0", p_REG_INPUTA_RST="RST0",
        p_REG_INPUTB_CLK="CLK0", p_REG_INPUTB_CE="CE0", p_REG_INPUTB_RST="RST0",
        p_REG_INPUTC_CLK="NONE", p_REG_PIPELINE_CLK="NONE", p_REG_OUTPUT_CLK="NONE",
        p_CLK0_DIV="ENABLED", p_HIGHSPEED_CLK="NONE", p_GSR="DISABLED",
        p_CAS_MATCH_REG="FALSE", p_SOURCEB_MODE="B_SHIFT", p_MULT_BYPASS="DISABLED",
        p_RESETMODE="SYNC",
        i_SIGNEDA=Const(1, 1), i_SIGNEDB=Const(1, 1),
        i_SOURCEA=Const(0, 1), i_SOURCEB=Const(0, 1),
        i_CLK0=ClockSignal("sync"), i_CE0=Const(1, 1), i_RST0=Const(0, 1),
        **ports,
    )
    return product


# Behavioural model of the MULT18X18D as hw/dsp.py and yosys's dsp_map_18x18.v instantiate it:
# combinational, or with the A and B input registers on CLK0 (clock enable CE0, synchronous
# reset RST0), per Lattice's ECP5 sysDSP usage guide. yosys ships no model of it. The
# pipeline and output registers, C and the cascades are not modelled (not used); a
# configuration that needs them stops the simulation.
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
  parameter CLK0_DIV = "ENABLED", HIGHSPEED_CLK = "NONE", GSR = "ENABLED";
  parameter CAS_MATCH_REG = "FALSE", SOURCEB_MODE = "B_SHIFT", MULT_BYPASS = "DISABLED";
  parameter RESETMODE = "SYNC";
  initial if (!(REG_INPUTA_CLK == "NONE" || REG_INPUTA_CLK == "CLK0")
              || !(REG_INPUTB_CLK == "NONE" || REG_INPUTB_CLK == "CLK0")
              || REG_PIPELINE_CLK != "NONE" || REG_OUTPUT_CLK != "NONE"
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
  wire [73:0] p = ea * eb;
  assign {P35, P34, P33, P32, P31, P30, P29, P28, P27, P26, P25, P24, P23, P22, P21, P20,
          P19, P18, P17, P16, P15, P14, P13, P12, P11, P10, P9, P8, P7, P6, P5, P4, P3, P2,
          P1, P0} = p[35:0];
endmodule
"""

#: Families whose primitives hw/ instantiates by hand, with their simulation models.
PRIMITIVE_FAMILIES = {"ecp5": {"MULT18X18D": _MULT18X18D_MODEL}}


def simulation_models(family: str | None) -> dict[str, str]:
    """Verilog models of the primitives ``family``'s mapping instantiates, by module name
    (none for the generic design)."""
    return dict(PRIMITIVE_FAMILIES.get(family, {})) if family else {}
