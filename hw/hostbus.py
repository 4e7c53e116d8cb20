"""The NPU's host port: a 32-bit word bus, one request a cycle, reads answered
``host_read_latency(config)`` cycles later (3, or 4 when a memory's entries span 8 or
more host words, as the default config's accumulators do). The UART bridge and the
testbenches drive it; ``npugen.memory_map`` is its map (and ``HOST_READ_LATENCY``)."""

from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["HostBus"]


class HostBus(wiring.Signature):
    """Seen from the host: ``valid`` with ``write``, ``addr`` and ``wdata`` makes a
    request, taken the same cycle; a read's ``rdata`` comes with ``rvalid``
    ``HOST_READ_LATENCY`` cycles later (reads are pipelined: one may be requested every
    cycle). Memory accesses during a run are refused (reads give 0) and flagged in
    STATUS.HOST_CONFLICT."""

    def __init__(self):
        super().__init__({
            "valid": Out(1),
            "write": Out(1),
            "addr": Out(32),
            "wdata": Out(32),
            "rvalid": In(1),
            "rdata": In(32),
        })
