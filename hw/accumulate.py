"""The accumulate path: each result row of the array (and, in feature-map builds, each row
REQUANT to_acc injects) is added into, combined by max with, or written over its
accumulator word.

A row's tag (its word, whether it accumulates, whether it combines by max) is given with
its activation word's issue and travels beside the data through the array's
``array_latency`` cycles. Then (``results_written_cycles``: the array latency + 3):

- the cycle before the row arrives, the accumulator memory reads its word;
- the cycle it arrives, what the memory returns and the row are registered side by side;
- the cycle after, they are added and written: the memory's slow clock-to-output and the
  adders sit in different cycles. A row written in the cycle its successor's read data
  is registered is forwarded; older writes reach the read through the port's
  transparency.
"""

from amaranth import Cat, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig, check_config_type
from ..memory_map import Region, memories
from ..timing import array_latency
from .array import psum_width
from .ports import ReadRequest, WriteRequest
from .to_acc import inject_layout

__all__ = ["AccumulatePath", "tag_layout"]


def tag_layout(config: NpuConfig) -> data.StructLayout:
    """What travels beside a result row: whether there is one, its accumulator word,
    whether it is added to (or, with ``max``, combined by max with) what the word holds."""
    return data.StructLayout({"valid": 1, "accumulate": 1, "max": 1,
                              "addr": range(config.accumulator_depth)})


class AccumulatePath(wiring.Component):
    """``issue`` is the tag of the activation word issued this cycle; ``result`` the
    array's result row, ``array_latency`` cycles after its issue. ``inject_read``,
    ``inject`` and ``inject_row`` are REQUANT to_acc's rows (feature-map builds): the
    destination word is read, then the row arrives in place of the array's. Writes are
    gated by ``running``: an aborted run leaves nothing behind."""

    def __init__(self, config: NpuConfig):
        self._config = check_config_type(config)
        acc = memories(config)[Region.ACCUMULATORS]
        row = data.ArrayLayout(signed(config.accumulator_width), config.cols)
        super().__init__({
            "issue": In(tag_layout(config)),
            "result": In(row),
            "inject_read": In(inject_layout(config)),
            "inject": In(inject_layout(config)),
            "inject_row": In(row),
            "running": In(1),
            "acc_read": Out(ReadRequest(depth=acc.depth, data_width=acc.width)),
            "acc_write": Out(WriteRequest(depth=acc.depth, data_width=acc.width,
                                          lanes=acc.width // acc.granularity)),
        })

    def elaborate(self, platform):
        c = self._config
        m = Module()
        cols, width = c.cols, c.accumulator_width
        # REQUANT to_acc's rows arrive beside the array's (the add), and max pooling's
        # combine: each with the feature-map hardware unless left out (NpuConfig).
        fm, max_combine = c.requant_to_acc, c.max_combine
        layout = tag_layout(c)
        tags = [self.issue]
        for i in range(array_latency(c.array_rows, c.skew_cols) + 1):
            delayed = Signal(layout, name=f"tag_d{i + 1}")
            m.d.sync += delayed.eq(tags[-1])
            tags.append(delayed)
        read_tag, tag = tags[-2], tags[-1]
        row_layout = data.ArrayLayout(signed(width), cols)
        add_tag = Signal(layout)
        # Without REQUANT to_acc only array rows arrive, each sum no wider than the array's
        # last row makes it (psum_width), and that is all the register keeps: on iCE40
        # each of its bits is a logic cell (it is fed by a register, so shares none).
        arriving_width = width if fm else psum_width(c, c.rows)
        # The rows are data (reset-less: add_tag.valid says when they count).
        add_row = Signal(data.ArrayLayout(signed(arriving_width), cols), reset_less=True)
        add_old = Signal(row_layout, reset_less=True)
        arriving_tag = Signal(layout)   # the row that arrives now: the array's or REQUANT's
        arriving_row = Signal(row_layout)
        # Plain multiplexers, not If/Else: a process whose inputs settle at time 0 could
        # stay undefined in an event-driven simulator (Icarus).
        injected = Signal(layout)
        m.d.comb += [injected.valid.eq(1), injected.accumulate.eq(self.inject.accumulate),
                     injected.addr.eq(self.inject.addr)]
        if fm:
            m.d.comb += [
                arriving_tag.eq(Mux(self.inject.valid, injected.as_value(), tag.as_value())),
                arriving_row.eq(Mux(self.inject.valid, self.inject_row.as_value(),
                                    self.result.as_value())),
            ]
        else:
            m.d.comb += [arriving_tag.eq(tag), arriving_row.eq(self.result)]
        m.d.sync += [add_tag.eq(arriving_tag),
                     *[add_row[k].eq(arriving_row[k]) for k in range(cols)]]
        # The read: the arriving row's word, or the injected row's (they never coincide:
        # REQUANT waits for the array to drain).
        if fm:
            m.d.comb += [
                self.acc_read.valid.eq(read_tag.valid | self.inject_read.valid),
                self.acc_read.addr.eq(Mux(self.inject_read.valid, self.inject_read.addr,
                                          read_tag.addr)),
            ]
        else:
            m.d.comb += [self.acc_read.valid.eq(read_tag.valid),
                         self.acc_read.addr.eq(read_tag.addr)]
        summed = Signal(row_layout)
        if max_combine:
            # One carry chain per lane does both: old + row, or old − row for max, whose
            # sign picks the larger.
            combined = []
            for k in range(cols):
                operand = Mux(add_tag.max, ~add_row[k], add_row[k])
                total = Signal(signed(width + 2), name=f"combine{k}")
                m.d.comb += total.eq(add_old[k] + operand + add_tag.max)
                combined.append(Mux(add_tag.max,
                                    Mux(total[width + 1], add_row[k], add_old[k]),
                                    total)[0:width])
        else:
            combined = [(add_old[k] + add_row[k])[0:width] for k in range(cols)]
        m.d.comb += summed.eq(Cat(*[Mux(add_tag.accumulate, combined[k], add_row[k])[0:width]
                                    for k in range(cols)]))
        writing = add_tag.valid & self.running
        with m.If(writing & (add_tag.addr == arriving_tag.addr)):
            m.d.sync += add_old.eq(summed)
        with m.Else():
            m.d.sync += add_old.eq(self.acc_read.data)
        m.d.comb += [self.acc_write.valid.eq(writing), self.acc_write.addr.eq(add_tag.addr),
                     self.acc_write.data.eq(summed), self.acc_write.en.eq(-1)]
        return m
