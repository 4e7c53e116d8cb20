"""The feeder (MATMUL): streams activation words into the array, one a cycle, each with
the tag of its result row (accumulator word, accumulate, max), and tracks what is in
flight: the rows still reading each weight bank, and those not yet written.

Timing (the cycle model's MATMUL rules, ``sw/timing.py``): a MATMUL dispatched in cycle
``d`` issues its ``count`` words in cycles ``d + 1 … d + count`` (each issue is the word's
memory read; the array takes it a cycle later). From a word's issue,

- its bank is read for ``weight_use_cycles`` more cycles (``inflight_idle`` of the bank
  falls with the issue and rises when that has passed: LOADW of the bank waits for it);
- its result is written ``results_written_cycles`` cycles after (``drain_idle`` rises
  then: REQUANT and HALT wait for it).

With the feature-map hardware, the words follow the SETWIN walk: ``row_length`` words
``col_step`` apart, then the next row ``row_step`` after the row's first word; with
``reduce``, every row after the first combines into one accumulator word.
"""

from amaranth import Array, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig
from ..isa import INSTRUCTION_WIDTH, Opcode
from ..memory_map import Region, memories
from ..timing import array_latency, weight_use_cycles
from .accumulate import tag_layout
from .instruction import instruction_field
from .ports import ReadRequest

__all__ = ["Feeder"]


class Feeder(wiring.Component):
    """Streams the MATMUL step given by ``bank``, ``act_addr``, ``acc_addr``, ``count``,
    ``accumulate`` and ``combine`` when ``dispatch`` is high. ``set_win`` loads the SETWIN
    held in ``instruction``; ``run_start`` restores its defaults; ``abort`` stops the
    stream and forgets what is in flight.

    ``issue`` is the tag of the word issued this cycle (for the accumulate path and the
    counters), ``act`` and ``array_bank`` feed the array. ``busy``, ``ready`` (idle or
    issuing its last word), ``feeding_bank``, ``inflight_idle`` (per bank) and
    ``drain_idle`` are what the sequencer's issue rules read.
    """

    def __init__(self, config: NpuConfig):
        if not isinstance(config, NpuConfig):
            raise TypeError(f"config must be an NpuConfig, not {config!r}")
        self._config = config
        act = memories(config)[Region.ACTIVATIONS]
        super().__init__({
            "dispatch": In(1),
            "bank": In(1),
            "act_addr": In(16),
            "acc_addr": In(16),
            "count": In(16),
            "accumulate": In(1),
            "combine": In(1),
            "instruction": In(INSTRUCTION_WIDTH),
            "set_win": In(1),
            "run_start": In(1),
            "abort": In(1),
            "running": In(1),
            "issue": Out(tag_layout(config)),
            "act_read": Out(ReadRequest(depth=act.depth, data_width=act.width)),
            "act": Out(act.width),
            "array_bank": Out(1),
            "busy": Out(1),
            "ready": Out(1),
            "feeding_bank": Out(1),
            "inflight_idle": Out(2, init=0b11),
            "drain_idle": Out(1, init=1),
        })

    def elaborate(self, platform):
        c = self._config
        m = Module()
        fm = c.feature_maps
        feed_busy = Signal()
        feed_remaining = Signal(16)
        feed_act_addr = Signal(range(c.activation_depth))
        feed_acc_addr = Signal(range(c.accumulator_depth))
        feed_bank = Signal()
        feed_accumulate = Signal()
        feed_max = Signal()
        # Kept in a register (set from the value feed_remaining takes next) so that no
        # compare lengthens the dispatch decision: feed_remaining == 1.
        feed_last = Signal()
        issue = Signal()
        m.d.comb += [
            issue.eq(self.running & feed_busy),
            self.issue.valid.eq(issue), self.issue.accumulate.eq(feed_accumulate),
            self.issue.max.eq(feed_max), self.issue.addr.eq(feed_acc_addr),
            self.act_read.valid.eq(issue), self.act_read.addr.eq(feed_act_addr),
            self.act.eq(self.act_read.data),
            self.busy.eq(feed_busy), self.ready.eq(~feed_busy | feed_last),
            self.feeding_bank.eq(feed_bank),
        ]
        m.d.sync += self.array_bank.eq(feed_bank)
        self._in_flight(m, issue, feed_bank)
        window = self._window(m) if fm else None

        with m.If(issue):
            m.d.sync += feed_remaining.eq(feed_remaining - 1)
            if fm:
                w = window
                with m.If(w["col"] == w["last_col"]):
                    next_row = w["row_addr"] + w["row_step"]
                    m.d.sync += [w["col"].eq(0), w["row_addr"].eq(next_row),
                                 feed_act_addr.eq(next_row)]
                with m.Else():
                    m.d.sync += [w["col"].eq(w["col"] + 1),
                                 feed_act_addr.eq(feed_act_addr + w["col_step"])]
                with m.If(w["reduce"]):  # every row after the first combines into one word
                    m.d.sync += feed_accumulate.eq(1)
                with m.Else():
                    m.d.sync += feed_acc_addr.eq(feed_acc_addr + 1)
            else:
                m.d.sync += [feed_act_addr.eq(feed_act_addr + 1),
                             feed_acc_addr.eq(feed_acc_addr + 1)]
            m.d.sync += feed_last.eq(feed_remaining == 2)
            with m.If(feed_last):
                m.d.sync += feed_busy.eq(0)
        with m.If(self.dispatch):
            m.d.sync += [
                feed_busy.eq(1), feed_remaining.eq(self.count),
                feed_last.eq(self.count == 1), feed_act_addr.eq(self.act_addr),
                feed_acc_addr.eq(self.acc_addr), feed_bank.eq(self.bank),
                feed_accumulate.eq(self.accumulate),
            ]
            if fm:
                w = window
                m.d.sync += [
                    feed_max.eq(self.combine), w["col"].eq(0), w["row_addr"].eq(self.act_addr),
                    w["last_col"].eq(w["win_last_col"]), w["row_step"].eq(w["win_row_step"]),
                    w["col_step"].eq(w["win_col_step"]), w["reduce"].eq(w["win_reduce"]),
                ]
        with m.If(self.abort):
            m.d.sync += feed_busy.eq(0)
        return m

    def _in_flight(self, m, issue, feed_bank):
        """Count down, per bank, the cycles its last word may still read it, and the
        cycles until the last result is written."""
        c = self._config
        use_cycles = weight_use_cycles(c.rows, c.cols)
        latency = array_latency(c.rows, c.cols)
        inflight = Array(Signal(range(use_cycles + 1), name=f"inflight{b}") for b in range(2))
        drain = Signal(range(latency + 3))
        inflight_idle, drain_idle = self.inflight_idle, self.drain_idle   # == 0, kept
        for b in range(2):
            with m.If(issue & (feed_bank == b)):
                m.d.sync += [inflight[b].eq(use_cycles - 1),
                             inflight_idle[b].eq(use_cycles == 1)]
            with m.Elif(inflight[b] != 0):
                m.d.sync += [inflight[b].eq(inflight[b] - 1),
                             inflight_idle[b].eq(inflight[b] == 1)]
        with m.If(issue):
            m.d.sync += [drain.eq(latency + 2), drain_idle.eq(0)]
        with m.Elif(drain != 0):
            m.d.sync += [drain.eq(drain - 1), drain_idle.eq(drain == 1)]
        with m.If(self.abort):
            m.d.sync += [drain.eq(0), inflight[0].eq(0), inflight[1].eq(0),
                         drain_idle.eq(1), inflight_idle[0].eq(1), inflight_idle[1].eq(1)]

    def _window(self, m) -> dict:
        """The SETWIN registers (feature-map builds), and the walk's registers, which
        latch them at dispatch: a SETWIN may follow a MATMUL while it still streams."""
        c = self._config

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
        return {
            "win_last_col": win_last_col, "win_row_step": win_row_step,
            "win_col_step": win_col_step, "win_reduce": win_reduce,
            "col": Signal(16, name="feed_col"),
            "row_addr": Signal(range(c.activation_depth), name="feed_row_addr"),
            "last_col": Signal(16, name="feed_last_col"),
            "row_step": Signal(16, name="feed_row_step"),
            "col_step": Signal(8, name="feed_col_step"),
            "reduce": Signal(name="feed_reduce"),
        }
