"""The weight loader (LOADW): shifts a tile of ``rows`` weight words into one bank of the
array while the feeder streams activations through the other, so preload is hidden.

Timing (the cycle model's ``load_free_at = dispatch + rows + 2``): from the cycle after
the dispatch the loader reads one word a cycle, the tile's last row first (it shifts down
to the bottom row of PEs), for ``rows`` cycles; each word reaches the array from the
memory the cycle after its read and is shifted in then. ``active`` is high from the
cycle after the dispatch to the cycle of the last shift.
"""

from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig, check_config_type
from ..memory_map import Region, memories
from .ports import ReadRequest

__all__ = ["WeightLoader"]


class WeightLoader(wiring.Component):
    """Loads ``rows`` words from ``weight_addr`` into weight bank ``bank`` of the array
    (``weight_row``, ``load``, ``load_bank``) when ``dispatch`` is high. ``busy`` and
    ``loading_bank`` are what the sequencer's issue rules read: a MATMUL on the bank being
    loaded waits. ``abort`` stops a load at once."""

    def __init__(self, config: NpuConfig):
        self._config = check_config_type(config)
        weights = memories(config)[Region.WEIGHTS]
        super().__init__({
            "dispatch": In(1),
            "bank": In(1),
            "weight_addr": In(16),
            "abort": In(1),
            "busy": Out(1),
            "loading_bank": Out(1),
            "weight_read": Out(ReadRequest(depth=weights.depth, data_width=weights.width)),
            "weight_row": Out(weights.width),
            "load": Out(1),
            "load_bank": Out(1),
        })

    def elaborate(self, platform):
        rows = self._config.rows
        m = Module()
        load_busy = Signal()
        load_count = Signal(range(rows))
        load_addr = Signal(range(self._config.weight_depth))
        load_bank = Signal()
        shift_valid = Signal()   # the word read last cycle shifts in
        shift_bank = Signal()
        m.d.sync += [shift_valid.eq(load_busy), shift_bank.eq(load_bank)]
        m.d.comb += [self.weight_read.valid.eq(load_busy), self.weight_read.addr.eq(load_addr)]
        with m.If(load_busy):
            m.d.sync += [load_addr.eq(load_addr - 1), load_count.eq(load_count + 1)]
            with m.If(load_count == rows - 1):
                m.d.sync += load_busy.eq(0)
        with m.If(self.dispatch):
            m.d.sync += [
                load_busy.eq(1), load_count.eq(0), load_bank.eq(self.bank),
                load_addr.eq(self.weight_addr + rows - 1),
            ]
        with m.If(self.abort):
            m.d.sync += load_busy.eq(0)
        m.d.comb += [
            self.busy.eq(load_busy | shift_valid),
            self.loading_bank.eq(load_bank),
            self.weight_row.eq(self.weight_read.data),
            self.load.eq(shift_valid),
            self.load_bank.eq(shift_bank),
        ]
        return m
