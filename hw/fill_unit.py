"""The fill unit (FILL, feature-map NPUs): writes one value to every lane of a walk of
activation words, one word a cycle, through the requantizer's write port (the sequencer
lets no REQUANT run beside it). A map's halo, its padding value, is written this way.

Timing (the cycle model's FILL rules, ``sw/timing.py``): a FILL dispatched in cycle ``d``
writes its ``count`` words in cycles ``d + 1 … d + count``; ``active`` is high in those
cycles.
"""

from amaranth import Cat, Module, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig, check_config_type
from ..isa import INSTRUCTION_WIDTH, Opcode
from ..memory_map import Region, memories
from .instruction import instruction_field
from .ports import WriteRequest

__all__ = ["FillUnit"]


class FillUnit(wiring.Component):
    """Runs the FILL held in ``instruction`` from the cycle ``dispatch`` is high;
    ``abort`` stops it. ``act_write`` writes while ``running``."""

    def __init__(self, config: NpuConfig):
        self._config = check_config_type(config)
        act = memories(config)[Region.ACTIVATIONS]
        super().__init__({
            "instruction": In(INSTRUCTION_WIDTH),
            "dispatch": In(1),
            "abort": In(1),
            "running": In(1),
            "active": Out(1),
            "act_write": Out(WriteRequest(depth=act.depth, data_width=act.width,
                                          lanes=act.width // act.granularity)),
        })

    def elaborate(self, platform):
        c = self._config
        m = Module()

        def field(name):
            return instruction_field(self.instruction, Opcode.FILL, name)

        remaining = Signal(16)
        addr = Signal(range(c.activation_depth))
        row_addr = Signal(range(c.activation_depth))
        col = Signal(8)
        last_col = Signal(8)
        endless = Signal()
        row_step = Signal(12)
        value = Signal(signed(len(field("value"))))
        lane = Signal(signed(c.input_width))   # the value sign-extended to a lane
        m.d.comb += lane.eq(value)
        # active == (remaining != 0), kept in a register (set from the value remaining
        # takes next) so that no compare lengthens the dispatch decision it feeds.
        m.d.comb += [
            self.act_write.valid.eq(self.active & self.running),
            self.act_write.addr.eq(addr),
            self.act_write.data.eq(Cat(*[lane] * c.rows)),
            self.act_write.en.eq((1 << len(self.act_write.en)) - 1),
        ]
        with m.If(self.active):
            m.d.sync += [remaining.eq(remaining - 1), self.active.eq(remaining != 1)]
            with m.If(~endless & (col == last_col)):
                next_row = row_addr + row_step
                m.d.sync += [col.eq(0), row_addr.eq(next_row), addr.eq(next_row)]
            with m.Else():
                m.d.sync += [col.eq(col + 1), addr.eq(addr + 1)]
        # While idle the walk's registers follow the held instruction's fields, so that
        # only `active` waits for the dispatch decision (the sequencer's longest path);
        # nothing reads them before a FILL dispatches (none dispatches while one is
        # active: it holds the sequencer's `requant_active`).
        with m.Else():
            length = field("row_length")
            m.d.sync += [
                remaining.eq(field("count")), addr.eq(field("out_addr")),
                row_addr.eq(field("out_addr")), col.eq(0), last_col.eq(length - 1),
                endless.eq(length == 0), row_step.eq(field("row_step")),
                value.eq(field("value")),
            ]
        with m.If(self.dispatch):
            m.d.sync += self.active.eq(field("count") != 0)
        with m.If(self.abort):
            m.d.sync += [remaining.eq(0), self.active.eq(0)]
        return m
