"""The performance counters (``COUNTER_NAMES``, ``COUNTER_BITS`` each) and UPTIME, as the
cycle model's :class:`~npugen.golden.Counters` counts them:

- ``cycles``: every cycle of a run, from the one after the CONTROL write that starts it
  to the HALT's dispatch;
- ``stall_cycles``: cycles in which an instruction is ready but may not dispatch;
- ``busy_cycles``: cycles in which the feeder issues an activation word;
- ``macs``: ``rows × cols`` per busy cycle.

An NPU generated without ``activity_counters`` has only ``cycles`` (and UPTIME); the
others read as zero, and the host, knowing the config, reports them as absent.
"""

from amaranth import Module, Signal
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig, check_config_type
from ..memory_map import COUNTER_BITS, COUNTER_NAMES

__all__ = ["PerformanceCounters", "counters_layout"]


def counters_layout() -> data.StructLayout:
    """Every performance counter by name (``COUNTER_NAMES``)."""
    return data.StructLayout({name: COUNTER_BITS for name in COUNTER_NAMES})


class PerformanceCounters(wiring.Component):
    """Counts while ``running``: ``stall`` and ``issue`` are that cycle's stall and
    activation issue. ``clear`` (a run's start) zeroes every counter; ``uptime`` counts
    every cycle since configuration."""

    def __init__(self, config: NpuConfig):
        self._config = check_config_type(config)
        super().__init__({
            "clear": In(1),
            "running": In(1),
            "stall": In(1),
            "issue": In(1),
            "counters": Out(counters_layout()),
            "uptime": Out(COUNTER_BITS),
        })

    def elaborate(self, platform):
        c = self._config
        m = Module()
        # Every busy cycle adds rows × cols MACs. For a power of two the count is
        # busy_cycles shifted (no logic); otherwise it is counted on its own, since the
        # product would put a 64-bit multiplier on the register read path (12×8: 51 MHz on
        # the ULX3S-85F).
        macs_per_cycle = c.rows * c.cols
        macs_derived = (macs_per_cycle & (macs_per_cycle - 1)) == 0
        counted = COUNTER_NAMES if c.activity_counters else ("cycles",)
        counters = {name: Signal(COUNTER_BITS, name=f"counter_{name}") for name in counted
                    if name != "macs" or not macs_derived}
        m.d.comb += [getattr(self.counters, name).eq(counter)
                     for name, counter in counters.items()]
        uptime = Signal(COUNTER_BITS)
        m.d.sync += uptime.eq(uptime + 1)
        m.d.comb += self.uptime.eq(uptime)
        with m.If(self.running):
            m.d.sync += counters["cycles"].eq(counters["cycles"] + 1)
        if c.activity_counters:
            if macs_derived:
                m.d.comb += self.counters.macs.eq(
                    counters["busy_cycles"] << (macs_per_cycle.bit_length() - 1))
            with m.If(self.running & self.stall):
                m.d.sync += counters["stall_cycles"].eq(counters["stall_cycles"] + 1)
            with m.If(self.issue):
                m.d.sync += counters["busy_cycles"].eq(counters["busy_cycles"] + 1)
                if not macs_derived:
                    m.d.sync += counters["macs"].eq(counters["macs"] + macs_per_cycle)
        with m.If(self.clear):   # last: a clear wins
            m.d.sync += [counter.eq(0) for counter in counters.values()]
        return m
