"""The GEMM's K-tile walk over the activations: the first activation word of each K tile's
MATMUL. One of two sub-units of :class:`~npugen.hw.gemm.GemmExpander`, chosen by the
configuration (:class:`npugen.golden.GemmState` is the reference):

- :class:`TileWalk` (NPUs without the feature-map hardware): each K tile's word is
  SETGEMM's ``tile_step`` after the last;
- :class:`KernelWalk` (``feature_maps``): the taps of SETKERN's kernel along its rows
  (one word apart), then its next row (``kernel_row_step`` after the row's first tap),
  then the next channel tile (``tile_step`` after the tile's first tap).
"""

from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..isa import INSTRUCTION_WIDTH, Opcode
from .instruction import instruction_field

__all__ = ["TapWalk", "TileWalk", "KernelWalk", "tap_walk"]


class TapWalk(wiring.Signature):
    """Seen from the walk: ``act_addr`` is the K tile's first activation word: the GEMM's
    ``gemm_act_addr`` until ``started``, then the walk's. ``step`` is high when a GEMM's
    step dispatches: its K tile's LOADW (``matmul`` low) holds the current position, its
    MATMUL (``matmul`` high) moves to the next K tile, and the GEMM's last MATMUL (``last``
    high too) rewinds the kernel. The walk's next position is worked out from
    ``matmul`` and ``last`` alone, and ``step`` (the end of the sequencer's dispatch
    decision, its longest path) only enables the registers. SETKERN (``set_kern`` with
    the ``instruction`` register) sets the kernel; ``run_start`` restores its defaults
    and rewinds."""

    def __init__(self):
        super().__init__({
            "gemm_act_addr": In(16),
            "tile_step": In(16),
            "started": In(1),
            "step": In(1),
            "matmul": In(1),
            "last": In(1),
            "instruction": In(INSTRUCTION_WIDTH),
            "set_kern": In(1),
            "run_start": In(1),
            "act_addr": Out(16),
        })


def tap_walk(feature_maps: bool) -> wiring.Component:
    """A :class:`KernelWalk` with the feature-map hardware, else a :class:`TileWalk`."""
    return KernelWalk() if feature_maps else TileWalk()


class TileWalk(wiring.Component):
    """One K tile after another, ``tile_step`` words apart (SETKERN is not decoded)."""

    def __init__(self):
        super().__init__(TapWalk())

    def elaborate(self, platform):
        m = Module()
        tap_run = Signal(16, name="gemm_tap_run")
        m.d.comb += self.act_addr.eq(Mux(self.started, tap_run, self.gemm_act_addr))
        with m.If(self.step):
            m.d.sync += tap_run.eq(self.act_addr + Mux(self.matmul, self.tile_step, 0))
        return m


class KernelWalk(wiring.Component):
    """The taps of SETKERN's kernel, tap x along a kernel row, row y, then the next channel
    tile; the activation word of the tap, of its kernel row and of its channel tile."""

    def __init__(self):
        super().__init__(TapWalk())

    def elaborate(self, platform):
        m = Module()

        def field(name):
            return instruction_field(self.instruction, Opcode.SETKERN, name)

        kernel_last_x = Signal(8)
        kernel_last_y = Signal(8)
        kernel_row_step = Signal(16)
        x = Signal(8, name="gemm_x")
        y = Signal(8, name="gemm_y")
        tap_run = Signal(16, name="gemm_tap_run")
        row_run = Signal(16, name="gemm_row_run")
        tile_run = Signal(16, name="gemm_tile_run")
        tap_now = self.act_addr
        row_now = Mux(self.started, row_run, self.gemm_act_addr)
        tile_now = Mux(self.started, tile_run, self.gemm_act_addr)
        m.d.comb += tap_now.eq(Mux(self.started, tap_run, self.gemm_act_addr))
        # The position after the step (a LOADW's: the current one, held).
        x_next, y_next = Signal.like(x), Signal.like(y)
        tap_next, row_next, tile_next = (Signal.like(tap_run), Signal.like(row_run),
                                         Signal.like(tile_run))
        m.d.comb += [x_next.eq(x), y_next.eq(y), tap_next.eq(tap_now), row_next.eq(row_now),
                     tile_next.eq(tile_now)]
        with m.If(self.matmul):
            # Next tap: along the kernel row, else the next kernel row, else the next
            # channel tile.
            with m.If(x != kernel_last_x):
                m.d.comb += [x_next.eq(x + 1), tap_next.eq(tap_now + 1)]
            with m.Elif(y != kernel_last_y):
                next_row = row_now + kernel_row_step
                m.d.comb += [x_next.eq(0), y_next.eq(y + 1), row_next.eq(next_row),
                             tap_next.eq(next_row)]
            with m.Else():
                next_tile = tile_now + self.tile_step
                m.d.comb += [x_next.eq(0), y_next.eq(0), tile_next.eq(next_tile),
                             row_next.eq(next_tile), tap_next.eq(next_tile)]
            with m.If(self.last):
                m.d.comb += [x_next.eq(0), y_next.eq(0)]
        with m.If(self.step):
            m.d.sync += [x.eq(x_next), y.eq(y_next), tap_run.eq(tap_next),
                         row_run.eq(row_next), tile_run.eq(tile_next)]
        with m.If(self.set_kern):
            m.d.sync += [
                kernel_last_x.eq(field("kernel_w") - 1),
                kernel_last_y.eq(field("kernel_h") - 1),
                kernel_row_step.eq(field("kernel_row_step")),
            ]
        with m.If(self.run_start):   # SETKERN starts from its defaults in every run
            m.d.sync += [x.eq(0), y.eq(0), kernel_last_x.eq(0), kernel_last_y.eq(0),
                         kernel_row_step.eq(0)]
        return m
