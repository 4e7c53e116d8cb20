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

``drain_wait`` counts the cycles until every word issued or still to issue in the
current stream has its result written: a REQUANT dispatched beside the stream
(``requant_overlap``) starts reading that many cycles later.

The words' addresses follow the feeder's walk (``feed_walk.py``): consecutive words, or
with the feature-map hardware the SETWIN walk.
"""

from amaranth import Array, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig, check_config_type
from ..isa import INSTRUCTION_WIDTH
from ..memory_map import Region, memories
from ..timing import array_latency, weight_use_cycles
from .accumulate import tag_layout
from .feed_walk import feed_walk
from .ports import ReadRequest

__all__ = ["Feeder"]


class Feeder(wiring.Component):
    """Streams the MATMUL step given by ``bank``, ``act_addr``, ``acc_addr``, ``count``,
    ``accumulate`` and ``combine`` when ``dispatch`` is high. ``set_win`` loads the SETWIN
    held in ``instruction``; ``run_start`` restores its defaults; ``abort`` stops the
    stream and forgets what is in flight.

    ``issue`` is the tag of the word issued this cycle (for the accumulate path; not
    valid for a depthwise MATMUL's lead), ``issuing`` says a word is issued (for the
    counters), ``act``, ``array_bank`` and in the depthwise mode ``array_depthwise`` and
    ``line_delay`` feed the array. ``busy``, ``ready`` (idle or
    issuing its last word), ``feeding_bank``, ``inflight_idle`` (per bank) and
    ``drain_idle`` are what the sequencer's issue rules read; ``drain_wait`` (the cycles
    until ``drain_idle`` would rise if no MATMUL followed) is what a REQUANT dispatched
    beside the stream waits.
    """

    def __init__(self, config: NpuConfig):
        self._config = check_config_type(config)
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
            "issuing": Out(1),
            **({"array_depthwise": Out(1),
                "line_delay": Out(range(config.line_buffer_depth))}
               if config.line_buffer_depth else {}),
            "busy": Out(1),
            "ready": Out(1),
            "feeding_bank": Out(1),
            "inflight_idle": Out(2, init=0b11),
            "drain_idle": Out(1, init=1),
            "drain_wait": Out(range((1 << 16) + array_latency(config.array_rows,
                                                              config.skew_cols) + 3)),
        })

    def elaborate(self, platform):
        c = self._config
        m = Module()
        # The addresses' walk: SETWIN's with the feature-map hardware, else linear.
        m.submodules.walk = walk = feed_walk(c)
        feed_busy = Signal()
        feed_remaining = Signal(16)
        feed_bank = Signal()
        feed_accumulate = Signal()
        feed_max = Signal()
        # Kept in a register (set from the value feed_remaining takes next) so that no
        # compare lengthens the dispatch decision: feed_remaining == 1.
        feed_last = Signal()
        issue = Signal()
        m.d.comb += [
            issue.eq(self.running & feed_busy), self.issuing.eq(issue),
            walk.ready.eq(self.ready), walk.start.eq(self.dispatch),
            walk.start_act_addr.eq(self.act_addr),
            walk.start_acc_addr.eq(self.acc_addr), walk.step.eq(issue),
            walk.instruction.eq(self.instruction), walk.set_win.eq(self.set_win),
            walk.run_start.eq(self.run_start),
            # The depthwise mode's lead only fills the line buffers: no result.
            self.issue.valid.eq(issue & ~walk.discard), self.issue.accumulate.eq(feed_accumulate),
            self.issue.max.eq(feed_max), self.issue.addr.eq(walk.acc_addr),
            self.act_read.valid.eq(issue), self.act_read.addr.eq(walk.act_addr),
            self.act.eq(self.act_read.data),
            self.busy.eq(feed_busy), self.ready.eq(~feed_busy | feed_last),
            self.feeding_bank.eq(feed_bank),
        ]
        m.d.sync += self.array_bank.eq(feed_bank)
        if c.line_buffer_depth:
            m.d.sync += self.array_depthwise.eq(walk.depthwise)
            m.d.comb += self.line_delay.eq(walk.line_delay)
        drain = self._in_flight(m, issue, feed_bank)
        # A stream's last word issues feed_remaining − 1 cycles from now; its result is
        # written latency + 3 cycles after (drain_idle rises as drain reaches 0).
        latency = array_latency(c.array_rows, c.skew_cols)
        m.d.comb += self.drain_wait.eq(Mux(feed_busy, feed_remaining + latency + 2, drain))

        with m.If(issue):
            m.d.sync += [feed_remaining.eq(feed_remaining - 1),
                         feed_last.eq(feed_remaining == 2)]
            with m.If(walk.reduce):  # every word after the first combines into one
                m.d.sync += feed_accumulate.eq(1)
            with m.If(feed_last):
                m.d.sync += feed_busy.eq(0)
        with m.If(self.dispatch):
            m.d.sync += [
                feed_busy.eq(1), feed_remaining.eq(self.count),
                feed_last.eq(self.count == 1), feed_bank.eq(self.bank),
                feed_accumulate.eq(self.accumulate),
            ]
            if c.max_combine:   # max pooling's combine
                m.d.sync += feed_max.eq(self.combine)
        with m.If(self.abort):
            m.d.sync += feed_busy.eq(0)
        return m

    def _in_flight(self, m, issue, feed_bank):
        """Count down, per bank, the cycles its last word may still read it, and the
        cycles until the last result is written (returned: 0 when ``drain_idle``)."""
        c = self._config
        # At least one: weight_use_cycles is 0 only with one row a segment, and a LOADW
        # then waits for the feeder's last issue anyway (the sequencer's rule).
        use_cycles = max(1, weight_use_cycles(c.load_rows, c.skew_cols, c.load_skew))
        latency = array_latency(c.array_rows, c.skew_cols)
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
        return drain
