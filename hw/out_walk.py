"""The requantization unit's output walk: the activation word each accumulator word's
results go to. One of two sub-units of :class:`~npugen.hw.requant_unit.RequantUnit`,
chosen by the configuration:

- :class:`LinearOutWalk` (NPUs without the feature-map hardware): consecutive words;
- :class:`RowOutWalk` (``feature_maps``): SETOUT's walk, ``row_length`` words along an
  output row, then the next row ``row_step`` after the row's first word (a map's rows
  with their halo between them).
"""

from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig
from ..isa import INSTRUCTION_WIDTH, Opcode
from .instruction import instruction_field

__all__ = ["OutWalk", "LinearOutWalk", "RowOutWalk", "out_walk"]


class OutWalk(wiring.Signature):
    """Seen from the walk: ``load`` sets the first word, ``start_addr``; at each ``step``
    the walk moves to ``next_addr``, its next word. SETOUT (``set_out`` with the
    ``instruction`` register) sets the rows of the next REQUANTs; ``run_start`` restores
    its defaults."""

    def __init__(self, config: NpuConfig):
        super().__init__({
            "load": In(1),
            "start_addr": In(16),
            "step": In(1),
            "instruction": In(INSTRUCTION_WIDTH),
            "set_out": In(1),
            "run_start": In(1),
            "next_addr": Out(range(config.activation_depth)),
        })


def out_walk(config: NpuConfig) -> wiring.Component:
    """A :class:`RowOutWalk` with the feature-map hardware, else a :class:`LinearOutWalk`."""
    return RowOutWalk(config) if config.feature_maps else LinearOutWalk(config)


class LinearOutWalk(wiring.Component):
    """Consecutive activation words (SETOUT is not decoded)."""

    def __init__(self, config: NpuConfig):
        super().__init__(OutWalk(config))
        self._config = config

    def elaborate(self, platform):
        m = Module()
        row_addr = Signal(range(self._config.activation_depth), name="rq_row_addr")
        m.d.comb += self.next_addr.eq(row_addr + 1)
        with m.If(self.step):
            m.d.sync += row_addr.eq(self.next_addr)
        with m.If(self.load):
            m.d.sync += row_addr.eq(self.start_addr)
        return m


class RowOutWalk(wiring.Component):
    """SETOUT's walk: along the output row, else the next row."""

    def __init__(self, config: NpuConfig):
        super().__init__(OutWalk(config))
        self._config = config

    def elaborate(self, platform):
        c = self._config
        m = Module()

        def field(name):
            return instruction_field(self.instruction, Opcode.SETOUT, name)

        out_last_col = Signal(16, init=0xFFFF)   # SETOUT row_length - 1
        out_row_step = Signal(16)
        with m.If(self.set_out):
            m.d.sync += [out_last_col.eq(field("row_length") - 1),
                         out_row_step.eq(field("row_step"))]
        with m.If(self.run_start):   # SETOUT starts from its defaults in every run
            m.d.sync += [out_last_col.eq(0xFFFF), out_row_step.eq(0)]

        col = Signal(16, name="rq_out_col")
        row_addr = Signal(range(c.activation_depth), name="rq_row_addr")
        line_addr = Signal(range(c.activation_depth), name="rq_line_addr")
        row_end = col == out_last_col
        next_line = line_addr + out_row_step
        m.d.comb += self.next_addr.eq(Mux(row_end, next_line, row_addr + 1))
        with m.If(self.step):
            m.d.sync += row_addr.eq(self.next_addr)
            with m.If(row_end):
                m.d.sync += [col.eq(0), line_addr.eq(next_line)]
            with m.Else():
                m.d.sync += col.eq(col + 1)
        with m.If(self.load):
            m.d.sync += [col.eq(0), row_addr.eq(self.start_addr),
                         line_addr.eq(self.start_addr)]
        return m
