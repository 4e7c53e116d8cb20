"""The feeder's address walk: which activation word a MATMUL reads next, and which
accumulator word its result goes to. One of two sub-units, chosen by the configuration:

- :class:`LinearWalk` (NPUs without the feature-map hardware): both addresses step by one;
- :class:`WindowWalk` (``feature_maps``): the SETWIN walk, ``row_length`` words
  ``col_step`` apart, then the next row ``row_step`` after the row's first word; with
  ``reduce``, every word after the first combines into one accumulator word.

Both load the next MATMUL's addresses whenever the feeder is ``ready`` for it (idle, or
issuing its last word: a MATMUL may dispatch; loading wins over ``step``) and advance at
each ``step`` (a word issued), so the feeder is the same for both. What they load is only
read while a MATMUL streams, and in its dispatch cycle they load what it holds: the
dispatch decision, the sequencer's longest path, then ends at fewer enables. Only what
is seen after the stream (the depthwise mode and the line buffers' delay) waits for
``start`` (the dispatch).
"""

from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig
from ..isa import INSTRUCTION_WIDTH, Opcode
from .instruction import instruction_field

__all__ = ["FeedWalk", "LinearWalk", "WindowWalk", "feed_walk"]


class FeedWalk(wiring.Signature):
    """Seen from the walk: ``ready`` (the feeder may take a MATMUL) with the held
    MATMUL's ``start_act_addr`` and ``start_acc_addr``, ``start`` its dispatch; ``step``
    after each word issued; ``act_addr`` and ``acc_addr`` the next word's; ``reduce`` high
    while every word accumulates into ``acc_addr``; in the depthwise mode
    (``depthwise``), ``discard`` high for the words whose results are dropped (the lead,
    and SETWIN's ``drop``: golden.depthwise_kept), and ``line_delay`` the line buffers'
    delay. SETWIN (``set_win`` with the ``instruction`` register) sets the walk of the next
    MATMULs; ``run_start`` restores its defaults."""

    def __init__(self, config: NpuConfig):
        super().__init__({
            "ready": In(1),
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
            # The depthwise mode (line_buffer_depth): the MATMUL's mode, its first
            # words' results to drop (the lead) and the line buffers' delay.
            "depthwise": Out(1),
            "discard": Out(1),
            "line_delay": Out(range(max(config.line_buffer_depth, 1))),
        })


def feed_walk(config: NpuConfig) -> wiring.Component:
    """The walk ``config``'s NPU has: a :class:`WindowWalk` with the feature-map hardware,
    else a :class:`LinearWalk`."""
    return WindowWalk(config) if config.feature_maps else LinearWalk(config)


class LinearWalk(wiring.Component):
    """Consecutive activation and accumulator words (SETWIN is not decoded; no
    depthwise mode)."""

    def __init__(self, config: NpuConfig):
        super().__init__(FeedWalk(config))

    def elaborate(self, platform):
        m = Module()
        with m.If(self.step):
            m.d.sync += [self.act_addr.eq(self.act_addr + 1), self.acc_addr.eq(self.acc_addr + 1)]
        with m.If(self.ready):
            m.d.sync += [self.act_addr.eq(self.start_act_addr),
                         self.acc_addr.eq(self.start_acc_addr)]
        return m


class WindowWalk(wiring.Component):
    """The SETWIN walk. The SETWIN registers are latched into the walk's own while the
    feeder is ``ready``: a SETWIN may follow a MATMUL while it still streams."""

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
        depthwise = bool(c.line_buffer_depth)
        win_depthwise = Signal()
        win_lead = Signal(16)                    # golden.depthwise_lead
        win_line_delay = Signal.like(self.line_delay)
        # The results dropped in each row of `pitch` words (golden.depthwise_kept): the
        # columns from drop_high on, and those from drop_low to 1.
        win_pitch_last = Signal(14)
        win_drop_low = Signal(2)
        win_drop_high = Signal(16)
        with m.If(self.set_win):
            m.d.sync += [win_last_col.eq(field("row_length") - 1),
                         win_row_step.eq(field("row_step")),
                         win_col_step.eq(field("col_step")), win_reduce.eq(field("reduce"))]
            if depthwise:
                pitch = field("pitch")
                drop = field("drop")
                m.d.sync += [win_depthwise.eq(field("depthwise")),
                             win_lead.eq(pitch * (c.depthwise_groups - 1) + 2),
                             win_line_delay.eq(pitch - 3), win_pitch_last.eq(pitch - 1),
                             win_drop_low.eq(Mux(drop >= 2, 0, 2 - drop)),
                             win_drop_high.eq(Mux(drop == 0, 0xFFFF, pitch + 2 - drop))]
        with m.If(self.run_start):   # SETWIN starts from its defaults in every run
            m.d.sync += [win_last_col.eq(0xFFFF), win_row_step.eq(0), win_col_step.eq(1),
                         win_reduce.eq(0), win_depthwise.eq(0)]

        col = Signal(16, name="feed_col")
        row_addr = Signal(range(c.activation_depth), name="feed_row_addr")
        last_col = Signal(16, name="feed_last_col")
        row_step = Signal(16, name="feed_row_step")
        col_step = Signal(8, name="feed_col_step")
        reduce = Signal(name="feed_reduce")
        lead_left = Signal(16, name="feed_lead_left")
        pitch_col = Signal(14, name="feed_pitch_col")    # the word's column: i mod pitch
        pitch_last = Signal(14, name="feed_pitch_last")
        drop_low = Signal(2, name="feed_drop_low")
        drop_high = Signal(16, name="feed_drop_high")
        dropped = ((pitch_col < 2) & (pitch_col >= drop_low)) | (pitch_col >= drop_high)
        m.d.comb += [self.reduce.eq(reduce),
                     self.discard.eq((lead_left != 0) | (self.depthwise & dropped))]
        with m.If(self.step):
            with m.If(lead_left != 0):
                m.d.sync += lead_left.eq(lead_left - 1)
            m.d.sync += pitch_col.eq(Mux(pitch_col == pitch_last, 0, pitch_col + 1))
        with m.If(self.step):
            with m.If(col == last_col):
                next_row = row_addr + row_step
                m.d.sync += [col.eq(0), row_addr.eq(next_row), self.act_addr.eq(next_row)]
            with m.Else():
                m.d.sync += [col.eq(col + 1), self.act_addr.eq(self.act_addr + col_step)]
            with m.If(~reduce & ~self.discard):
                m.d.sync += self.acc_addr.eq(self.acc_addr + 1)
        with m.If(self.ready):
            m.d.sync += [
                self.act_addr.eq(self.start_act_addr), self.acc_addr.eq(self.start_acc_addr),
                col.eq(0), row_addr.eq(self.start_act_addr), last_col.eq(win_last_col),
                row_step.eq(win_row_step), col_step.eq(win_col_step), reduce.eq(win_reduce),
                lead_left.eq(Mux(win_depthwise, win_lead, 0)),
                pitch_col.eq(0), pitch_last.eq(win_pitch_last), drop_low.eq(win_drop_low),
                drop_high.eq(win_drop_high),
            ]
        with m.If(self.start):   # seen by the array after the stream: at the dispatch only
            m.d.sync += self.depthwise.eq(win_depthwise)
            if depthwise:
                # Only a depthwise MATMUL sets the line buffers' delay: the words of the
                # last one may still be in them (golden.check_program).
                with m.If(win_depthwise):
                    m.d.sync += self.line_delay.eq(win_line_delay)
        return m
