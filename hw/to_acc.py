"""REQUANT ``to_acc`` (feature-map hardware): the requantizers' raw 32-bit results go back
into the accumulators, where the elementwise add sums its two inputs. A sub-unit of
:class:`~npugen.hw.requant_unit.RequantUnit`, which NPUs generated without
``feature_maps`` or without ``adds`` do not have (``NpuConfig.requant_to_acc``).

The unit collects the groups of each accumulator word as they leave the requantizers,
then sends the word down the accumulate path: ``inject_read`` (its destination word is
read) and, a cycle later, ``inject`` with ``inject_row`` (it joins the path, added to the
word or written over it). On an NPU without ``requant_overlap`` the requantization unit
and the accumulate path share the accumulators' read port: the unit then reads its source
words every other cycle (``hold``), so that the destination read (in the cycle a word's
last group leaves the lanes) has the port to itself. With ``requant_overlap`` the unit
reads through a port of its own and takes a group every cycle.
"""

from amaranth import Module, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig

__all__ = ["AccumulatorReturn", "inject_layout", "inject_members"]


def inject_layout(config: NpuConfig) -> data.StructLayout:
    """A REQUANT to_acc result row on its way into the accumulate path: its accumulator
    word and whether it is added to what the word holds."""
    return data.StructLayout({"valid": 1, "accumulate": 1,
                              "addr": range(config.accumulator_depth)})


def inject_members(config: NpuConfig) -> dict[str, wiring.Member]:
    """The ports of a unit that sends rows down the accumulate path (REQUANT to_acc,
    RESCALE): ``inject_read`` (the destination word is read), then a cycle later
    ``inject`` with ``inject_row`` (the row joins the path)."""
    return {
        "inject_read": Out(inject_layout(config)),
        "inject": Out(inject_layout(config)),
        "inject_row": Out(data.ArrayLayout(signed(config.accumulator_width), config.cols)),
    }


class AccumulatorReturn(wiring.Component):
    """``dispatch`` of a REQUANT with its ``to_acc``, ``accumulate`` and destination word
    ``dest`` (its ``out_addr``); ``busy`` while the REQUANT reads its source words;
    ``out_valid`` and ``raw`` are the lanes' group leaving them. ``enabled``: this REQUANT
    goes to the accumulators (its activation writes are off); ``hold``: skip this cycle's
    source read; ``active``: results still on their way."""

    def __init__(self, config: NpuConfig):
        self._config = config
        super().__init__({
            "dispatch": In(1),
            "to_acc": In(1),
            "accumulate": In(1),
            "dest": In(range(config.accumulator_depth)),
            "busy": In(1),
            "running": In(1),
            "out_valid": In(1),
            "raw": In(config.requant_lanes * config.accumulator_width),
            "enabled": Out(1),
            "hold": Out(1),
            "active": Out(1),
            **inject_members(config),
        })

    def elaborate(self, platform):
        c = self._config
        m = Module()
        lanes = c.requant_lanes
        groups = c.cols // lanes
        to_acc = Signal(name="rq_to_acc")
        accumulate = Signal(name="rq_acc_accumulate")
        phase = Signal(name="rq_phase")
        raw_group = Signal(range(groups))
        raw_dest = Signal(range(c.accumulator_depth))
        inject_write = Signal()                # the injected row is written
        # Data only, qualified by inject: no reset (512 flip-flops on a 16×16).
        inject_row = Signal.like(self.inject_row, reset_less=True)
        m.d.comb += self.inject_row.eq(inject_row)
        inject_read, inject = self.inject_read, self.inject
        # With requant_overlap the source reads have a port of their own: no hold.
        shared_port = not c.requant_overlap
        collecting = self.out_valid & to_acc
        m.d.comb += [self.enabled.eq(to_acc), self.hold.eq(to_acc & phase if shared_port else 0),
                     self.active.eq(inject_read.valid | inject.valid | inject_write)]

        with m.If(self.busy & to_acc):
            m.d.sync += phase.eq(~phase)
        with m.If(self.dispatch):
            m.d.sync += [to_acc.eq(self.to_acc), accumulate.eq(self.accumulate),
                         phase.eq(0), raw_group.eq(0), raw_dest.eq(self.dest)]

        # A word's last group leaves the lanes: its destination word is read in that cycle
        # and the whole row, registered, joins the path in the next (before the next
        # word's first group, a cycle later at the earliest, replaces it). Without the
        # port of its own this is a cycle in which the requantizer does not read.
        m.d.comb += [inject_read.valid.eq(collecting & (raw_group == groups - 1)
                                          & self.running),
                     inject_read.accumulate.eq(accumulate), inject_read.addr.eq(raw_dest)]
        m.d.sync += [inject.eq(inject_read), inject_write.eq(inject.valid)]
        with m.If(collecting):
            m.d.sync += inject_row.as_value().word_select(
                raw_group, lanes * c.accumulator_width).eq(self.raw)
            with m.If(raw_group == groups - 1):
                m.d.sync += [raw_group.eq(0), raw_dest.eq(raw_dest + 1)]
            with m.Else():
                m.d.sync += raw_group.eq(raw_group + 1)
        return m
