"""The weight loader (LOADW): shifts a tile of ``rows`` weight words into one bank of the
array while the feeder streams activations through the other, so preload is hidden.

Timing (sw/timing.py): from the cycle after the dispatch the loader reads one word a
cycle, the tile's last row first (it shifts down to the bottom row of PEs), for ``rows``
cycles; each word reaches the array from the memory the cycle after its read and is
shifted in then (``WEIGHT_LOAD_STAGES``); with one weight bank it goes straight to row
``load_index`` instead, where the shift would leave it. ``busy`` is high from the cycle
after the dispatch to the cycle of the last shift. The next LOADW may dispatch in the
cycle of the last read (``ready``, ``load_next_cycles``), so tiles load back to back; a
MATMUL on the bank being loaded may dispatch ``weight_load_cycles`` after the dispatch
(``filling`` falls), its words behind the last shift.

With ``weight_segments`` S the weight memory is S parts and the columns S segments of
L = rows / S rows: segment s takes the tile's rows sL to sL + L − 1 from part s, L words
read one a cycle, s·L cycles after segment 0 (as an activation word reaches its rows s·L
cycles later), so a tile loads in L cycles and the rules above read ``rows`` as L
(``NpuConfig.load_rows``).
"""

from amaranth import Module, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig, check_config_type
from ..memory_map import Region, memories
from ..timing import load_next_cycles, weight_load_cycles
from .ports import ReadRequest

__all__ = ["WeightLoader"]


class WeightLoader(wiring.Component):
    """Loads ``rows`` words from ``weight_addr`` into weight bank ``bank`` of the array
    (``weight_row``, ``load``, ``load_bank``) when ``dispatch`` is high. ``busy``,
    ``ready``, ``filling`` and ``loading_bank`` are what the sequencer's issue rules read:
    a LOADW waits for ``ready``, a MATMUL on ``loading_bank`` while ``filling``, HALT while
    ``busy``. ``abort`` stops a load at once."""

    def __init__(self, config: NpuConfig):
        self._config = check_config_type(config)
        weights = memories(config)[Region.WEIGHTS]
        super().__init__({
            "dispatch": In(1),
            "bank": In(1),
            "weight_addr": In(16),
            "abort": In(1),
            "busy": Out(1),
            "ready": Out(1),
            "filling": Out(1),
            "loading_bank": Out(1),
            "weight_read": Out(ReadRequest(depth=weights.depth // config.weight_segments,
                                           data_width=weights.width)),
            "weight_row": Out(weights.width),
            "load": Out(1),
            "load_bank": Out(1),
            **({"load_index": Out(range(config.rows))} if config.weight_banks == 1 else {}),
            **(self._segment_members(config, weights) if config.weight_segments > 1 else {}),
        })

    @staticmethod
    def _segment_members(config: NpuConfig, weights) -> dict:
        """Segments 1 to S − 1's reads of their memory parts and loads (segment 0's are
        ``weight_read``, ``weight_row``, ``load``, ``load_bank``)."""
        more = config.weight_segments - 1
        part = ReadRequest(depth=weights.depth // config.weight_segments,
                           data_width=weights.width)
        return {"segment_read": Out(part).array(more),
                "segment_row": Out(data.ArrayLayout(weights.width, more)),
                "segment_load": Out(more), "segment_load_bank": Out(more)}

    def elaborate(self, platform):
        c = self._config
        # Each segment loads `rows` words, the whole tile with one segment.
        rows, cols, segments = c.load_rows, c.cols, c.weight_segments
        if load_next_cycles(rows, cols) != rows:
            raise NotImplementedError("the loader takes the next LOADW on its last read")
        # A MATMUL on the bank may dispatch from the cycle the loader reads word
        # `matmul_from` (the dispatch cycle reads nothing: word k is read k + 1 later).
        matmul_from = weight_load_cycles(rows, cols) - 1
        m = Module()
        load_busy = Signal()
        # Registered beside the count, so that the sequencer's issue decision starts from
        # flip-flops: this cycle reads the last word; a MATMUL on the bank must wait.
        last_read = Signal()
        filling = Signal()
        load_count = Signal(range(rows))
        load_addr = Signal(range(c.weight_depth // segments))
        load_bank = Signal()
        shift_valid = Signal()   # the word read last cycle shifts in
        shift_bank = Signal()
        # An abort stops the shifts too: no word is loaded after it (nor, with segments,
        # carried into their delay lines).
        m.d.sync += [shift_valid.eq(load_busy & ~self.abort), shift_bank.eq(load_bank)]
        if self._config.weight_banks == 1:   # the row the word read last cycle goes to
            m.d.sync += self.load_index.eq(rows - 1 - load_count)
        m.d.comb += [self.weight_read.valid.eq(load_busy), self.weight_read.addr.eq(load_addr)]
        with m.If(load_busy):
            m.d.sync += [load_addr.eq(load_addr - 1), load_count.eq(load_count + 1),
                         last_read.eq(load_count + 2 == rows),
                         filling.eq(load_count + 1 < matmul_from)]
            with m.If(load_count == rows - 1):
                m.d.sync += load_busy.eq(0)
        # The tile's first row in each part: weight_addr / S (a multiple of c.rows, which
        # check_program asks of such NPUs).
        first = self.weight_addr >> (segments.bit_length() - 1)
        with m.If(self.dispatch):
            m.d.sync += [
                load_busy.eq(1), load_count.eq(0), load_bank.eq(self.bank),
                load_addr.eq(first + rows - 1),
                last_read.eq(rows == 1), filling.eq(matmul_from > 0),
            ]
        with m.If(self.abort):
            m.d.sync += [load_busy.eq(0), last_read.eq(0), filling.eq(0)]
        busy = load_busy | shift_valid
        if segments > 1:
            busy = self._segments(m, load_busy, load_addr, shift_valid, shift_bank, busy)
        m.d.comb += [
            self.busy.eq(busy),
            self.ready.eq(~load_busy | last_read),
            self.filling.eq(filling),
            self.loading_bank.eq(load_bank),
            self.weight_row.eq(self.weight_read.data),
            self.load.eq(shift_valid),
            self.load_bank.eq(shift_bank),
        ]
        return m

    def _segments(self, m: Module, read_valid, read_addr, shift_valid, shift_bank, busy):
        """Segment s's reads and loads: segment 0's, s·L cycles later (the valid bits
        reset and cleared by ``abort``); returns ``busy`` held until the last segment's
        last shift."""
        c = self._config
        rows = c.load_rows
        valid, addr, shift, bank = read_valid, read_addr, shift_valid, shift_bank
        for s in range(1, c.weight_segments):
            for _ in range(rows):   # s·L cycles behind segment 0
                later = (Signal(name=f"segment{s}_read_valid"),
                         Signal.like(read_addr, name=f"segment{s}_read_addr"),
                         Signal(name=f"segment{s}_shift"),
                         Signal(name=f"segment{s}_shift_bank"))
                m.d.sync += [later[0].eq(valid & ~self.abort), later[1].eq(addr),
                             later[2].eq(shift & ~self.abort), later[3].eq(bank)]
                valid, addr, shift, bank = later
            read = self.segment_read[s - 1]
            m.d.comb += [read.valid.eq(valid), read.addr.eq(addr),
                         self.segment_row[s - 1].eq(read.data),
                         self.segment_load[s - 1].eq(shift),
                         self.segment_load_bank[s - 1].eq(bank)]
            busy = busy | valid | shift
        return busy
