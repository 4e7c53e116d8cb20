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


# The default configurations are what fits and meets timing, measured with
# `npugen build --board NAME` (docs/BOARDS.md has the reports): DSP multipliers, block
# RAM, and a PLL at the clock the design reaches on the board.
# The iCEBreaker's weights go to SPRAM (hw/ram.py): one SB_SPRAM256KA holds 16K words of
# its 2-column array, which with 256 instructions and 128 parameter words takes the demo
# MLP. Its 4x2 uses all 8 DSPs (one SB_MAC16 per row for the two columns, four for the
# requantizer), 5212 of the 5280 LCs and 29 of the 30 EBRs, at 24 MHz (25.97 achieved at
# seed 1; at 27 MHz seeds 1-6 reached 23.3-25.0 MHz after ISA version 3, against 28.0
# before: docs/BOARDS.md). 512 accumulator words let the demo MLP run at batch 16:
# 953.6 cycles per inference (1193.8 at 256 words, batch 8; 1876.8 at 128, batch 4).
_ICEBREAKER = dict(activation_depth=512, weight_depth=16384, accumulator_depth=512,
                   instruction_depth=256, param_depth=128, requant_lanes=1)
# The iCEBreaker's and the Tang Nano 9K's NPUs leave out the feature-map hardware (address
# walks, max, add): with it, the iCEBreaker's 2x2 needed 6110 of 5280 LCs, and the Tang's
# 4x4 (6685 LUT4 + 2100 ALU of 8640) did not place (before 2026-11-29's savings of some
# 500 LCs).
# Enough for the demo MLP (64-64-32-10) and models of its size.
_MEDIUM = dict(activation_depth=1024, weight_depth=2048, accumulator_depth=512,
               instruction_depth=512, param_depth=128, requant_lanes=1)
# Room for MLPerf Tiny's keyword spotter (DS-CNN, kws_ref_model.tflite) besides the demo
# models: on an 8×8 it needs 2,512 activation, 4,864 weight, 1,009 instruction and 664
# parameter words, on a 12×8 1,884, 7,716, 1,189 and 784 (what `npugen compile
# kws_ref_model.tflite --board NAME` reports short), in depths that are multiples of 256.
# Built 2026-12-02, seed 1: the 25F's 8×8 takes 49 of its 56 DP16KD (83.6 MHz at 75), the
# OrangeCrab's the same (106.9 at 48), the 45F's 12×8 65 of 108 (82.9 at 75).
_KWS_8X8 = dict(activation_depth=2560, weight_depth=5120, accumulator_depth=512,
                instruction_depth=1024, param_depth=768, requant_lanes=1)
_KWS_12X8 = dict(activation_depth=2048, weight_depth=7936, accumulator_depth=512,
                 instruction_depth=1280, param_depth=1024, requant_lanes=1)
# On the 85F's 12×12: 1,884, 4,752, 557 and 744 words; these memories take 83 of 208
# DP16KD and reach 78.9 MHz at 72 (seed 1, 2026-12-02). ResNet-8's memories did not route
# in a CI-length build (docs/BOARDS.md).
_KWS_12X12 = dict(activation_depth=2048, weight_depth=8192, accumulator_depth=512,
                  instruction_depth=1024, param_depth=1024, requant_lanes=1)

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
          # rounding="double": both roundings take 52 more LCs (5263 of 5280, 24.5 MHz at a
          # 27 MHz constraint). It runs models whose layers round twice (npugen-quantized,
          # TFLite convolutions) and refuses ONNX QDQ ones, which round once.
          NpuConfig(rows=4, cols=2, feature_maps=False, rounding="double", **_ICEBREAKER),
          description="1BitSquared iCEBreaker, iCE40UP5K",
          loader_name="ice40_generic", device="ice40up5k", pll_mhz=24.0),
    *(Board(f"ulx3s-{size}f", _platform("ulx3s", f"ULX3S_{size}F_Platform"), "ecp5", 25e6,
            NpuConfig(rows=rows, cols=cols, **memories),
            description=f"Radiona ULX3S, LFE5U-{size}F", loader_name="ulx3s", pll_mhz=pll,
            device=f"lfe5u-{size}f")
      # The rows past the device's MULT18X18Ds multiply in logic (boards/estimate.py,
      # array_dsp_products): the 25F's 8×8 has 3 rows in DSPs and 5 in logic (19888 LUTs),
      # the 45F's 12×8 8 and 4, the 85F's 12×12 8 and 4 (nextpnr does not route 144
      # MULT18X18Ds; the 85F asks 72 MHz since ISA version 3: seeds 1, 3 reached 73.07 and
      # 72.9 MHz at a 75 MHz constraint, 80.3 before). The 12F keeps its 4×4 (the 25F's
      # 8×8 takes more than its 12K LUTs).
      for size, rows, cols, pll, memories in (
          (12, 4, 4, 80.0, _MEDIUM), (25, 8, 8, 75.0, _KWS_8X8), (45, 12, 8, 75.0, _KWS_12X8),
          (85, 12, 12, 72.0, _KWS_12X12))),
    # 4×4 places again since the narrower counters, requantizer and partial sums
    # (2026-11-29: 5704 LUT4 + 1556 ALU of 8640 positions, 3659 flip-flops, 75.3 MHz; it
    # had found no legal placement at 5689 + 1940 and 4144 flip-flops).
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
    try:
        return BOARDS[name]
    except KeyError:
        raise UnknownBoard(f"unknown board {name!r}; known boards: "
                           f"{', '.join(BOARDS)}") from None


def soc_clock_hz(board: Board) -> float:
    """The clock the SoC runs at on ``board``."""
    return board.pll_mhz * 1e6 if board.pll_mhz else board.clock_hz
