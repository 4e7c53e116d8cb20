"""A line buffer of the depthwise mode: delays a row of the array's column chain by a
set number of cycles, so that the next group of rows sees the window's next kernel row
(hw/array.py)."""

from amaranth import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig

__all__ = ["LineBuffer"]


class LineBuffer(wiring.Component):
    """``line_out`` is ``line_in`` of ``delay`` + 2 cycles before (``delay`` from 1 to
    ``line_buffer_depth`` − 1). A memory of ``line_buffer_depth`` words of ``cols``
    lanes, written every cycle at a pointer that moves on by one, read ``delay`` words
    behind it; the read port's register and an output register are the last two
    cycles."""

    def __init__(self, config: NpuConfig):
        self._config = config
        lanes = data.ArrayLayout(signed(config.input_width), config.cols)
        super().__init__({
            "line_in": In(lanes),
            "delay": In(range(config.line_buffer_depth)),
            "line_out": Out(lanes),
        })

    def elaborate(self, platform):
        c = self._config
        m = Module()
        depth = c.line_buffer_depth
        m.submodules.lines = lines = Memory(shape=unsigned(c.cols * c.input_width),
                                            depth=depth, init=[])
        write, read = lines.write_port(), lines.read_port()
        pointer = Signal(range(depth))
        m.d.sync += pointer.eq(Mux(pointer == depth - 1, 0, pointer + 1))
        m.d.comb += [write.addr.eq(pointer), write.data.eq(self.line_in.as_value()),
                     write.en.eq(1)]
        # The block RAM's output is slow (5.6 ns on ECP5): registered before the PEs, in
        # a register without reset (data: a MATMUL's lead drops what it holds first).
        line_out = Signal.like(self.line_out, reset_less=True)
        m.d.sync += line_out.eq(read.data)
        m.d.comb += self.line_out.eq(line_out)
        # Read (pointer − delay) mod depth: the word written delay cycles ago.
        with m.If(pointer >= self.delay):
            m.d.comb += read.addr.eq(pointer - self.delay)
        with m.Else():
            m.d.comb += read.addr.eq(pointer + depth - self.delay)
        return m
