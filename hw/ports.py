"""Signatures by which a unit claims a port of one of the NPU's memories, and the helpers
that give it the port.

Each memory has one read and one write port (``hw/ram.py``); the host owns them outside a
run and the units take them during one. A unit asks for a port with a request; the NPU
grants the requests in a fixed order (a later claim overrides an earlier one in the same
cycle), so the units never arbitrate among themselves.
"""

from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["ReadRequest", "WriteRequest", "grant_read", "grant_write"]


class ReadRequest(wiring.Signature):
    """Seen from the unit: while ``valid``, the memory (of ``depth`` entries) reads entry
    ``addr``; ``data`` is the port's output, the entry read the cycle before."""

    def __init__(self, *, depth: int, data_width: int):
        super().__init__({"valid": Out(1), "addr": Out(range(depth)), "data": In(data_width)})


class WriteRequest(wiring.Signature):
    """Seen from the unit: while ``valid``, ``data`` is written to entry ``addr`` in the
    write lanes set in ``en``."""

    def __init__(self, *, depth: int, data_width: int, lanes: int):
        super().__init__({"valid": Out(1), "addr": Out(range(depth)), "data": Out(data_width),
                          "en": Out(lanes)})


def grant_read(m, port, request) -> None:
    """Point read ``port`` at ``request.addr`` while the request is valid (overriding
    earlier grants) and show the port's output to the requester."""
    with m.If(request.valid):
        m.d.comb += port.addr.eq(request.addr)
    m.d.comb += request.data.eq(port.data)


def grant_write(m, port, request) -> None:
    """Let ``request`` drive write ``port`` while it is valid (overriding earlier
    grants)."""
    with m.If(request.valid):
        m.d.comb += [port.addr.eq(request.addr), port.data.eq(request.data),
                     port.en.eq(request.en)]
