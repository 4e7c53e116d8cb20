"""Open FPGA boards: the SoC on amaranth-boards platforms, built with yosys/nextpnr."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import NpuConfig

__all__ = ["Board", "BOARDS", "board_named", "UnknownBoard", "soc_clock_hz"]


class UnknownBoard(ValueError):
    """A board name npugen does not know; the message lists the known ones."""


@dataclass(frozen=True)
class Board:
    """A supported board: its platform, FPGA family and default NPU configuration."""

    name: str
    platform: Callable[[], object]
    family: str            # "ice40", "ecp5" or "gowin"
    clock_hz: float        # the board's oscillator
    default_config: NpuConfig
    baud: int = 115200
    description: str = ""
    loader_name: str = ""  # openFPGALoader's -b name
    pll_mhz: float | None = None  # the SoC's clock from the PLL; None: the oscillator
    device: str = ""       # a key of boards.estimate.DEVICES
    seed: int = 1          # nextpnr's placement seed for the default build


def _platform(module: str, cls: str) -> Callable[[], object]:
    def make():
        import importlib

        return getattr(importlib.import_module(f"amaranth_boards.{module}"), cls)()
    return make


# Each board's default is the largest NPU that fits its device and meets its clock
# (`npugen build --board NAME`; docs/BOARDS.md has the resources, Fmax and the models each
# default holds). Arrays take DSP multipliers up to the device's budget
# (boards/estimate.py, board_implementation), the rows past it multiply in logic.

# The iCEBreaker's UP5K profile (docs/BOARDS.md): a 4×4 with the feature-map hardware, its
# 16 products in the eight SB_MAC16s (whose B registers hold the weights: one bank), the
# requantizer's product in logic (4 bits a cycle, Booth-recoded: a channel every 6), rows
# broadcast, only the cycles counter, no link error counters, no max pooling or adds. The
# weights
# (16K words) and the single-port activations (8K) take the four SPRAMs, the rest 29 of
# the 30 EBRs. That holds MLPerf Tiny's keyword spotter (npugen compile kws_ref_model.tflite
# --board icebreaker: 4,688 activation words, sums of 21 bits, nine stages of at most 512
# instructions; with 256 accumulator words a depthwise layer alone takes 581) and, in
# stages, its anomaly detector (sums of 22 bits).
_ICEBREAKER = dict(rows=4, cols=4, activation_depth=8192, weight_depth=16384,
                   accumulator_depth=512, instruction_depth=512, param_depth=256,
                   requant_lanes=1, accumulator_width=22, requant_serial_bits=4,
                   weight_banks=1, row_broadcast=True, load_skew=False,
                   single_port_activations=True, max_pooling=False, adds=False,
                   activity_counters=False, link_error_counters=False)
# Enough for the demo MLP (64-64-32-10) and models of its size.
_MEDIUM = dict(activation_depth=1024, weight_depth=2048, accumulator_depth=512,
               instruction_depth=512, param_depth=128, requant_lanes=1)
# Room for MLPerf Tiny's keyword spotter (DS-CNN, kws_ref_model.tflite) besides the demo
# models: what `npugen compile kws_ref_model.tflite --board NAME` reports it needs,
# rounded up to multiples of 256 words. The one lane runs beside the array
# (requant_overlap: KWS in 105,254 cycles against 172,490); its copy of the accumulators
# takes the block RAM that 512 instruction words free (KWS needs 433 with it, 1,009
# without). The depthwise mode's line buffer (rows of up to 16 words, in LUT RAM: the
# block RAM is full) takes KWS from 89,973 cycles to 82,841.
_KWS_8X8 = dict(activation_depth=2560, weight_depth=5120, accumulator_depth=512,
                instruction_depth=512, param_depth=768, requant_lanes=1,
                requant_overlap=True, line_buffer_depth=16)
# The 45F's 8×8 holds ResNet-8 (6,668 activation words, 9,816 weight words) and KWS,
# with four requantizer lanes (12 MULT18X18Ds; the array's top 7 rows in the other 56)
# beside the array and the depthwise mode's line buffers with the tap row (a 3×3 depthwise
# kernel in one pass: KWS 48,231 -> 45,127 cycles; 74.33 MHz with it, 2b3ea1a): KWS in
# 45,127 cycles, ResNet-8 in 222,382 (npugen compile MODEL.tflite --board ulx3s-45f).
# With the rescale tables (an add's input rescales looked up, a column's copy of the two
# tables in a DP16KD each: 107 of 108) ResNet-8 takes 207,229 cycles with 512 parameter
# words, which hold all three adds' tables (213,245 with 256, the first add's only; a
# 288-bit parameter word takes eight 36-bit DP16KDs at 256 or 512 deep alike). The build
# meets 70 MHz at 75.72 (npugen bench --only boards --boards ulx3s-45f,ulx3s-85f at
# 781cb0d, seed 1; 75.41 with 256 words at c11761b; at 8722917, before the TABLE's entry
# and the looked-up row were registered, 69.27).
# 99 of 108 DP16KD. It met 75
# MHz at 76.79 (seed 1) and 79.03 (seed 2) until the column-skewed weight loads (3df5039),
# then reached 73.77 and 73.79 (npugen build --board ulx3s-45f --json [--seed 2],
# docs/CHANGELOG.md), on paths from block RAMs across the chip: its PLL makes 70. Its former
# 12×8 with two lanes (no requant_overlap: its build with it stopped in yosys's ABC9, no
# line buffers: not square) ran KWS in 128,803 cycles and held no ResNet-8 (6,668 words).
_RESNET_8X8 = dict(activation_depth=6912, weight_depth=10240, accumulator_depth=512,
                   instruction_depth=1024, param_depth=512, requant_lanes=4,
                   requant_overlap=True, line_buffer_depth=16, depthwise_tap_row=True,
                   rescale_tables=True)
# The 85F's 16×16 holds ResNet-8 (3,334 activation words, 4,976 weight words) and KWS
# (AD runs in stages, docs/MODELS.md), with eight requantizer lanes (24 MULT18X18Ds, three
# a lane) beside the array
# (requant_overlap: a copy of the accumulators' block RAM) and the depthwise mode's line
# buffers (rows of up to 64 words). ResNet-8 in 64,964 cycles, KWS in 14,784. Sixteen
# lanes (48 MULT18X18Ds, 144 of 156; ResNet-8 56,462 cycles, KWS 13,098) took 71,707 of
# the 83,640 LUTs and did not route: nextpnr's router had 253,435 of 302,626 arcs left
# after 2,100 s (npugen bench --only boards at 3f92123, docs/CHANGELOG.md). 7,168
# activation words, for VWW's maps, did not route either: 270,147 of 273,523 arcs left
# after 1,347 s (the default of 1a59bd3, docs/CHANGELOG.md).
# Without the load skew: with it (3df5039) the router had 245,441 of 274,274 arcs left
# after 2,341 s (seed 1) and 232,152 after 1,173 s (seed 2); without it the default meets
# 65 MHz at 73.04 (ce7378f). Its gain here (npugen compile MODEL.tflite --board ulx3s-85f
# --load-skew true): ResNet-8 63,985 -> 63,960 cycles, KWS none, VWW 70,160 -> 65,754
# (docs/CHANGELOG.md).
_RESNET_16X16 = dict(activation_depth=3584, weight_depth=5120, accumulator_depth=512,
                     instruction_depth=1024, param_depth=512, requant_lanes=8,
                     requant_overlap=True, line_buffer_depth=64, load_skew=False)


def _orangecrab_25f() -> object:
    """The OrangeCrab r0.2 (25F) has no USB-serial bridge: the UART goes on the Feather
    header, FPGA RX on pin 0 and TX on pin 1, to a 3.3 V USB-serial adapter."""
    from amaranth.build import Attrs
    from amaranth_boards.orangecrab_r0_2 import OrangeCrabR0_2_25FPlatform
    from amaranth_boards.resources import UARTResource

    platform = OrangeCrabR0_2_25FPlatform()
    platform.add_resources([UARTResource(0, rx="0", tx="1", conn=("io", 0),
                                         attrs=Attrs(IO_TYPE="LVCMOS33", PULLMODE="UP"))])
    return platform


BOARDS: dict[str, Board] = {board.name: board for board in (
    Board("icebreaker", _platform("icebreaker", "ICEBreakerPlatform"), "ice40", 12e6,
          NpuConfig(**_ICEBREAKER),
          description="1BitSquared iCEBreaker, iCE40UP5K",
          # 30 MHz, the iCEBreaker issue's target: met at seeds 1, 3 and 4 (docs/BOARDS.md
          # has the seeds).
          loader_name="ice40_generic", device="ice40up5k", pll_mhz=30.0),
    *(Board(f"ulx3s-{size}f", _platform("ulx3s", f"ULX3S_{size}F_Platform"), "ecp5", 25e6,
            NpuConfig(rows=rows, cols=cols, **memories),
            description=f"Radiona ULX3S, LFE5U-{size}F", loader_name="ulx3s", pll_mhz=pll,
            device=f"lfe5u-{size}f")
      # Rows in MULT18X18Ds and in logic: the 25F's 8×8 3 and 5, the 45F's 8×8 7 and 1,
      # the 85F's 16×16 6 and 10 (ECP5_DSP_PRODUCTS). The 12F keeps a 4×4: an 8×8 takes
      # more than its 12K LUTs.
      for size, rows, cols, pll, memories in (
          (12, 4, 4, 80.0, _MEDIUM), (25, 8, 8, 75.0, _KWS_8X8), (45, 8, 8, 70.0, _RESNET_8X8),
          (85, 16, 16, 65.0, _RESNET_16X16))),
    # Without the feature-map hardware, like the iCEBreaker (with it, neither board's
    # array placed when it was last tried: docs/CHANGELOG.md, 2026-11-28).
    Board("tang-nano-9k", _platform("tang_nano_9k", "TangNano9kPlatform"), "gowin", 27e6,
          NpuConfig(rows=4, cols=4, feature_maps=False, **_MEDIUM),
          description="Sipeed Tang Nano 9K, GW1NR-9C (Apicula flow)", loader_name="tangnano9k",
          device="gw1nr-9c"),
    # The 25F's 8×8 as on the ULX3S-25F (3 rows in DSPs), at the 48 MHz oscillator.
    Board("orangecrab-25f", _orangecrab_25f, "ecp5", 48e6,
          NpuConfig(rows=8, cols=8, **_KWS_8X8),
          description="1BitSquared OrangeCrab r0.2, LFE5U-25F (UART on header pins 0/1)",
          loader_name="orangeCrab", device="lfe5u-25f"),
)}


def board_named(name: str) -> Board:
    """The board called ``name`` (a key of :data:`BOARDS`); raises :class:`UnknownBoard`,
    listing the known names, for any other."""
    try:
        return BOARDS[name]
    except KeyError:
        raise UnknownBoard(f"unknown board {name!r}; known boards: "
                           f"{', '.join(BOARDS)}") from None


def soc_clock_hz(board: Board) -> float:
    """The clock the SoC runs at on ``board``."""
    return board.pll_mhz * 1e6 if board.pll_mhz else board.clock_hz
