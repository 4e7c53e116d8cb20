"""The weight loader (LOADW): writes a tile of ``rows`` weight words into one bank of the
array, row by row, behind the last activation word that uses the bank's old tile.

Timing (the cycle model's ``load_free_at = dispatch + rows + 2``): from the cycle after
the dispatch the loader reads one word a cycle, row 0 first, for ``rows`` cycles; each
word reaches the array from the memory the cycle after its read and is written into its
row of PEs then (hw/array.py: the writes run ahead of the activation wave, so a MATMUL on
the bank may follow the LOADW at once). ``busy`` is high from the cycle after the
dispatch to the cycle of the last write.
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
    (``weight_row``, ``load``, ``load_bank``, ``load_row``) when ``dispatch`` is high.
    ``busy`` is what the sequencer's issue rules read: the next LOADW, and HALT, wait for
    it. ``abort`` stops a load at once."""

    def __init__(self, config: NpuConfig):
        self._config = check_config_type(config)
        weights = memories(config)[Region.WEIGHTS]
        super().__init__({
            "dispatch": In(1),
            "bank": In(1),
            "weight_addr": In(16),
            "abort": In(1),
            "busy": Out(1),
            "weight_read": Out(ReadRequest(depth=weights.depth, data_width=weights.width)),
            "weight_row": Out(weights.width),
            "load": Out(1),
            "load_bank": Out(1),
            "load_row": Out(range(config.rows)),
        })

    def elaborate(self, platform):
        rows = self._config.rows
        m = Module()
        load_busy = Signal()
        load_count = Signal(range(rows))
        load_addr = Signal(range(self._config.weight_depth))
        load_bank = Signal()
        write_valid = Signal()   # the word read last cycle is written
        write_bank = Signal()
        write_row = Signal(range(rows))
        m.d.sync += [write_valid.eq(load_busy), write_bank.eq(load_bank),
                     write_row.eq(load_count)]
        m.d.comb += [self.weight_read.valid.eq(load_busy), self.weight_read.addr.eq(load_addr)]
        with m.If(load_busy):
            m.d.sync += [load_addr.eq(load_addr + 1), load_count.eq(load_count + 1)]
            with m.If(load_count == rows - 1):
                m.d.sync += load_busy.eq(0)
        with m.If(self.dispatch):
            m.d.sync += [
                load_busy.eq(1), load_count.eq(0), load_bank.eq(self.bank),
                load_addr.eq(self.weight_addr),
            ]
        with m.If(self.abort):
            m.d.sync += load_busy.eq(0)
        m.d.comb += [
            self.busy.eq(load_busy | write_valid),
            self.weight_row.eq(self.weight_read.data),
            self.load.eq(write_valid),
            self.load_bank.eq(write_bank),
            self.load_row.eq(write_row),
        ]
        return m
