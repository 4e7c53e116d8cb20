"""The feeder's address walk: which activation word a MATMUL reads next, and which
accumulator word its result goes to. One of two sub-units, chosen by the configuration:

- :class:`LinearWalk` (NPUs without the feature-map hardware): both addresses step by one;
- :class:`WindowWalk` (``feature_maps``): the SETWIN walk, ``row_length`` words
  ``col_step`` apart, then the next row ``row_step`` after the row's first word; with
  ``reduce``, every word after the first combines into one accumulator word.

Both load the MATMUL's addresses at ``start`` (which wins over ``step`` in the same
cycle) and advance at each ``step`` (a word issued), so the feeder is the same for both.
"""

from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig
from ..isa import INSTRUCTION_WIDTH, Opcode
from .instruction import instruction_field

__all__ = ["FeedWalk", "LinearWalk", "WindowWalk", "feed_walk"]


class FeedWalk(wiring.Signature):
    """Seen from the walk: ``start`` with the MATMUL's ``start_act_addr`` and
    ``start_acc_addr``; ``step`` after each word issued; ``act_addr`` and ``acc_addr`` the
    next word's; ``reduce`` high while every word accumulates into ``acc_addr``. SETWIN
    (``set_win`` with the ``instruction`` register) sets the walk of the next MATMULs;
    ``run_start`` restores its defaults."""

    def __init__(self, config: NpuConfig):
        super().__init__({
            "start": In(1),
            "start_act_addr": In(16),
            "start_acc_addr": In(16),
            "step": In(1),
            "instruction": In(INSTRUCTION_WIDTH),
            "set_win": In(1),
            "run_start": In(1),
            "act_addr": Out(range(config.activation_depth)),
            "acc_addr": Out(range(config.accumulator_depth)),
            "reduce": Out(1),
        })


def feed_walk(config: NpuConfig) -> wiring.Component:
    """The walk ``config``'s NPU has: a :class:`WindowWalk` with the feature-map hardware,
    else a :class:`LinearWalk`."""
    return WindowWalk(config) if config.feature_maps else LinearWalk(config)


class LinearWalk(wiring.Component):
    """Consecutive activation and accumulator words (SETWIN is not decoded)."""

    def __init__(self, config: NpuConfig):
        super().__init__(FeedWalk(config))

    def elaborate(self, platform):
        m = Module()
        with m.If(self.step):
            m.d.sync += [self.act_addr.eq(self.act_addr + 1), self.acc_addr.eq(self.acc_addr + 1)]
        with m.If(self.start):
            m.d.sync += [self.act_addr.eq(self.start_act_addr),
                         self.acc_addr.eq(self.start_acc_addr)]
        return m


class WindowWalk(wiring.Component):
    """The SETWIN walk. The SETWIN registers are latched into the walk's own at ``start``:
    a SETWIN may follow a MATMUL while it still streams."""

    def __init__(self, config: NpuConfig):
        super().__init__(FeedWalk(config))
        self._config = config

    def elaborate(self, platform):
        c = self._config
        m = Module()

        def field(name):
            return instruction_field(self.instruction, Opcode.SETWIN, name)

        win_last_col = Signal(16, init=0xFFFF)   # SETWIN row_length - 1
        win_row_step = Signal(16)
        win_col_step = Signal(8, init=1)
        win_reduce = Signal()
        with m.If(self.set_win):
            m.d.sync += [win_last_col.eq(field("row_length") - 1),
                         win_row_step.eq(field("row_step")),
                         win_col_step.eq(field("col_step")), win_reduce.eq(field("reduce"))]
        with m.If(self.run_start):   # SETWIN starts from its defaults in every run
            m.d.sync += [win_last_col.eq(0xFFFF), win_row_step.eq(0), win_col_step.eq(1),
                         win_reduce.eq(0)]

        col = Signal(16, name="feed_col")
        row_addr = Signal(range(c.activation_depth), name="feed_row_addr")
        last_col = Signal(16, name="feed_last_col")
        row_step = Signal(16, name="feed_row_step")
        col_step = Signal(8, name="feed_col_step")
        reduce = Signal(name="feed_reduce")
        m.d.comb += self.reduce.eq(reduce)
        with m.If(self.step):
            with m.If(col == last_col):
                next_row = row_addr + row_step
                m.d.sync += [col.eq(0), row_addr.eq(next_row), self.act_addr.eq(next_row)]
            with m.Else():
                m.d.sync += [col.eq(col + 1), self.act_addr.eq(self.act_addr + col_step)]
            with m.If(~reduce):
                m.d.sync += self.acc_addr.eq(self.acc_addr + 1)
        with m.If(self.start):
            m.d.sync += [
                self.act_addr.eq(self.start_act_addr), self.acc_addr.eq(self.start_acc_addr),
                col.eq(0), row_addr.eq(self.start_act_addr), last_col.eq(win_last_col),
                row_step.eq(win_row_step), col_step.eq(win_col_step), reduce.eq(win_reduce),
            ]
        return m
