"""Resources a configuration needs for certain, known before synthesis: the build refuses
a configuration that cannot fit instead of spending minutes in place and route.

The board build elaborates the NPU for :func:`board_implementation` (its family, DSP budget
and SPRAM), and the estimate counts for the same, so the two cannot disagree."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import NpuConfig
from ..hw.dsp import ICE40_MIN_DSP_PRODUCT_BITS, dsp_rows, paired_columns
from ..hw.implementation import ECP5_DSP_PRODUCTS, Implementation
from ..hw.ram import SPRAM_BLOCKS, spram_plan
from ..memory_map import Region, memories, parted_memories
from ..protocol import RX_FIFO_BYTES

__all__ = ["Device", "DEVICES", "Estimate", "board_implementation", "estimate"]


@dataclass(frozen=True)
class Device:
    """An FPGA's hard blocks, as the flow uses them for the NPU."""

    name: str
    multiplier_slots: int       # 9x9-class slots: one per int8 product
    multiplier_name: str
    wide_product_slots: int     # slots one 32x32 requantizer product takes (hw/dsp.py's
                                # requant_product_blocks: three 18x18 blocks, four 16x16)
    block_ram_bits: int         # in block RAM the memories map to
    block_ram_name: str
    block_ram_count: int
    logic: int                  # LUT4 (or LC) count
    logic_name: str
    min_product_bits: int = 0   # narrower products stay in logic
    paired_products: bool = False  # two int8 products per slot, as hw/dsp.py pairs them
    spram_blocks: int = 0          # iCE40UP5K SPRAM, which hw/ram.py maps single-port memories to
    family: str = ""               # whose primitives hw/dsp.py, hw/ram.py instantiate


DEVICES = {
    # The array's products go two per SB_MAC16 (hw/dsp.py); any other multiply with a
    # product of 11 bits or more takes a whole SB_MAC16 (hw/dsp.py's 16×16 mode, where
    # synth_ice40 -dsp would put it too).
    "ice40up5k": Device("iCE40UP5K", 8, "SB_MAC16", 4, 30 * 4096, "EBR", 30, 5280, "LC",
                         min_product_bits=ICE40_MIN_DSP_PRODUCT_BITS, paired_products=True,
                         spram_blocks=SPRAM_BLOCKS, family="ice40"),
    "lfe5u-12f": Device("LFE5U-12F", 28, "MULT18X18D", 3, 32 * 18432, "DP16KD", 32, 12288,
                        "LUT", family="ecp5"),
    "lfe5u-25f": Device("LFE5U-25F", 28, "MULT18X18D", 3, 56 * 18432, "DP16KD", 56, 24288,
                        "LUT", family="ecp5"),
    "lfe5u-45f": Device("LFE5U-45F", 72, "MULT18X18D", 3, 108 * 18432, "DP16KD", 108, 43848,
                        "LUT", family="ecp5"),
    "lfe5u-85f": Device("LFE5U-85F", 156, "MULT18X18D", 3, 208 * 18432, "DP16KD", 208, 83640,
                        "LUT", family="ecp5"),
    # Two MULT9X9 per MULT18X18; the requantizer's product takes three MULT18X18, six
    # 9x9 slots.
    "gw1nr-9c": Device("GW1NR-9C", 40, "MULT9X9", 6, 26 * 18432, "BSRAM", 26, 8640, "LUT4"),
}


@dataclass(frozen=True)
class Estimate:
    """Lower bounds on what a configuration takes of a device (:func:`estimate`);
    :meth:`problems` compares them with the device's."""

    # Multiplier slots (the unit of Device.multiplier_slots): the array's products in DSP
    # blocks and each requantizer lane's wide product.
    multipliers: int
    # Every memory not in SPRAM, and the host link's receive FIFO.
    block_ram_bits: int
    # SB_SPRAM256KA blocks the weights (and single-port activations) take on iCE40 (they go
    # there only where they fit, hw/ram.py's spram_plan, so problems() does not check them).
    spram_blocks: int = 0

    def problems(self, device: Device) -> list[str]:
        """What cannot fit on ``device``, in words; empty when nothing is known to overflow."""
        found = []
        if self.multipliers > device.multiplier_slots:
            found.append(f"{self.multipliers} multiplier slots ({device.multiplier_name}) "
                         f"needed, the {device.name} has {device.multiplier_slots}")
        if self.block_ram_bits > device.block_ram_bits:
            found.append(f"{self.block_ram_bits // 1024} Kbit of block RAM needed, the "
                         f"{device.name} has {device.block_ram_bits // 1024} Kbit "
                         f"({device.block_ram_count} {device.block_ram_name})")
        return found


def _requant_blocks(config: NpuConfig, device: Device) -> int:
    """Hard multipliers the requantizer lanes' products take: none when serial."""
    return 0 if config.requant_serial_bits else config.requant_lanes * device.wide_product_slots


def board_implementation(config: NpuConfig, device: Device) -> Implementation:
    """What the build for ``device`` elaborates ``config`` for (a simulation with the same
    mapping takes it too): the device's family (generic where hw/ instantiates none of its
    primitives), with its default SPRAM regions, and on ECP5 a DSP budget of
    ``ECP5_DSP_PRODUCTS`` and no more than the MULT18X18Ds the requantizer lanes leave
    (whole rows from the top, hw/dsp.py's ``dsp_rows``; the rows below multiply in logic).
    Elsewhere every product goes to DSP blocks, as the family maps them."""
    if device.family != "ecp5":
        return Implementation(device.family)
    spare = device.multiplier_slots - _requant_blocks(config, device)
    return Implementation(device.family, dsp_products=max(0, min(ECP5_DSP_PRODUCTS, spare)))


def estimate(config: NpuConfig, device: Device) -> Estimate:
    """Lower bounds, for the build's :func:`board_implementation`: every product of the
    array's rows in DSP blocks (or pair of products, where the device pairs them; rows past
    its DSP budget multiply in logic) and each requantizer lane's 32x32 product takes hard
    multipliers (none with ``requant_serial_bits``), and every memory's bits take block
    RAM (the accumulators' twice with ``requant_overlap``, the depthwise mode's line
    buffers and the rescale tables), or SPRAM where hw/ram.py maps it there."""
    implementation = board_implementation(config, device)
    in_spram = spram_plan(implementation, memories(config), parted_memories(config))
    bits = sum(info.depth * info.width for region, info in memories(config).items()
               if not in_spram[region])
    if config.requant_overlap:   # the requantizer's read port: a copy of the accumulators
        accumulators = memories(config)[Region.ACCUMULATORS]
        bits += accumulators.depth * accumulators.width
    # The depthwise mode's line buffers: a row of `cols` activations per word.
    bits += (max(config.depthwise_groups - 1, 0) * config.line_buffer_depth * config.cols
             * config.input_width)
    if config.rescale_tables:   # both tables, a copy per column (hw/rescale_unit.py)
        bits += config.cols * 2 * config.table_entries * config.accumulator_width
    product_bits = config.input_width + config.weight_width
    paired = (paired_columns(implementation, config.cols, config.input_width,
                             config.weight_width)
              if device.paired_products else 0)
    rows = dsp_rows(implementation, config.rows, config.cols)
    alone = rows * (config.cols - paired)
    products = rows * paired // 2 + (alone if product_bits >= device.min_product_bits
                                     else 0)
    return Estimate(
        multipliers=products + _requant_blocks(config, device),
        block_ram_bits=bits + RX_FIFO_BYTES * 8, spram_blocks=sum(in_spram.values()))
