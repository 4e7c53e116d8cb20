"""What the gateware is implemented on: the FPGA family whose primitives hw/dsp.py and
hw/ram.py instantiate by hand, the array's DSP budget and the memories that go to SPRAM.

The NPU and its units take an :class:`Implementation` in their constructors and decide
their mapping from it alone, never from the Amaranth platform they are elaborated for; the
board build derives it from the board's device (``boards/estimate.py``,
``board_implementation``), as the resource estimate does, and a simulation can ask for
any, to run the primitives' models.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..memory_map import Region

__all__ = ["FAMILIES", "ECP5_DSP_PRODUCTS", "ICE40_SPRAM_REGIONS", "GENERIC", "Implementation",
           "check_implementation"]

#: Families whose primitives hw/ instantiates by hand (hw/dsp.py's ``PRIMITIVE_FAMILIES``
#: has their simulation models); "" is the generic design.
FAMILIES = ("ecp5", "ice40")

#: On ECP5 at most this many of the array's products go to MULT18X18Ds, in whole rows from
#: the top; the rows below multiply in logic (hw/dsp.py, ``fabric_product``). nextpnr 0.11
#: does not route a 12×12 array with all 144 products in MULT18X18Ds (148 of the
#: LFE5U-85F's 156, with the requantizer's four): 55,000 of 74,000 arcs were left after
#: 12 minutes of routing. With 96 in MULT18X18Ds and 48 in logic it routed in 14 minutes
#: beside two other builds, and met 75 MHz (docs/BOARDS.md).
ECP5_DSP_PRODUCTS = 96

#: Memories that may go to the iCE40UP5K's SPRAM by default, if single-port
#: (``MemoryInfo.single_port``): the weights, written by the host only, when no run is on,
#: and the activations of an NPU generated with ``single_port_activations``.
ICE40_SPRAM_REGIONS = frozenset({Region.WEIGHTS, Region.ACTIVATIONS})


def _default_spram_regions(family: str) -> frozenset[Region]:
    return ICE40_SPRAM_REGIONS if family == "ice40" else frozenset()


@dataclass(frozen=True)
class Implementation:
    """The target the gateware is built for.

    ``family``: ``"ecp5"`` or ``"ice40"`` (one of :data:`FAMILIES`), whose DSP blocks and
    SPRAM are instantiated by hand, or ``""``: the generic design, which leaves every
    product and memory to the synthesis tool.
    ``dsp_products``: at most so many of the array's products in DSP blocks, in whole rows
    from the top (hw/dsp.py, ``dsp_rows``); None: the family's own limit
    (:data:`ECP5_DSP_PRODUCTS` on ECP5, none elsewhere).
    ``spram_regions``: the memories that may go to SPRAM (hw/ram.py, ``spram_blocks``);
    None: the family's default (:data:`ICE40_SPRAM_REGIONS` on iCE40, none elsewhere).
    Only iCE40 has SPRAM.

    ``poison_collisions`` (simulations only): a read of a memory whose collisions are
    don't-care (hw/ram.py, ``no_rw_check``) that meets a write of the same word in the
    same cycle returns the written lanes inverted instead of their old value, so that a
    test that used such a read would fail, as the board's block RAM may return anything.

    Raises ``ValueError`` for an unknown family, a negative budget, or SPRAM regions that
    are not memories or not on iCE40.
    """

    family: str = ""
    dsp_products: int | None = None
    spram_regions: frozenset[Region] | None = None
    poison_collisions: bool = False

    def __post_init__(self):
        if self.family != "" and self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, or \"\" for the "
                             f"generic design, not {self.family!r}")
        budget = self.dsp_products
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                                   or budget < 0):
            raise ValueError(f"dsp_products must be a non-negative integer or None, not "
                             f"{self.dsp_products!r}")
        regions = self.spram_regions
        if regions is None:
            regions = _default_spram_regions(self.family)
        elif not isinstance(regions, Iterable) or isinstance(regions, str) or not all(
                isinstance(region, Region) and region is not Region.REGISTERS
                for region in regions):
            raise ValueError(f"spram_regions must be memory regions (Region.WEIGHTS, ...), "
                             f"not {regions!r}")
        regions = frozenset(regions)
        if regions and self.family != "ice40":
            raise ValueError(f"only iCE40 has SPRAM: spram_regions must be empty for family "
                             f"{self.family!r}, not {sorted(r.name for r in regions)}")
        # Frozen: the default is filled in here, once.
        object.__setattr__(self, "spram_regions", regions)

    @property
    def is_generic(self) -> bool:
        """Whether this is the generic design: no family's primitives, no DSP budget."""
        return self == GENERIC

    @property
    def dsp_budget(self) -> int | None:
        """At most how many of the array's products go to DSP blocks: ``dsp_products``, or
        the family's limit; None: all of them."""
        if self.dsp_products is None and self.family == "ecp5":
            return ECP5_DSP_PRODUCTS
        return self.dsp_products

    @property
    def name(self) -> str:
        """The family (``generic`` for ""), with the product limit when one is given and
        the SPRAM regions when they are not the family's default: ``ecp5-dsp40``,
        ``ice40-spram-none``. Simulator builds are cached by it."""
        name = (self.family or "generic") + (
            "" if self.dsp_products is None else f"-dsp{self.dsp_products}")
        if self.spram_regions != _default_spram_regions(self.family):
            name += "-spram-" + ("-".join(sorted(region.name.lower()
                                                 for region in self.spram_regions)) or "none")
        return name + ("-poisoned" if self.poison_collisions else "")


#: The generic design: every product and memory left to the synthesis tool.
GENERIC = Implementation()


def check_implementation(implementation: Implementation) -> Implementation:
    """``implementation``, checked to be an :class:`Implementation` (a component's
    constructor argument); raises ``TypeError`` naming what it got otherwise."""
    if not isinstance(implementation, Implementation):
        raise TypeError(f"implementation must be an Implementation, not {implementation!r}")
    return implementation
