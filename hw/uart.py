"""8N1 UART receiver and transmitter with stream interfaces."""

from amaranth import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = ["UartRx", "UartTx"]


class _Uart(wiring.Component):
    """Common to both directions: ``divisor`` clock cycles a bit (at least 4)."""

    def __new__(cls, *, divisor: int, src_loc_at: int = 0):
        # Checked before the object exists: a component refused in __init__ would still
        # warn that it was never elaborated.
        if not isinstance(divisor, int) or divisor < 4:
            raise ValueError(f"divisor (clock cycles a bit) must be an integer of at least "
                             f"4, not {divisor!r}")
        return super().__new__(cls, src_loc_at=src_loc_at + 1)

    def __init__(self, *, divisor: int, src_loc_at: int = 0):
        self._divisor = divisor
        super().__init__()


class UartRx(_Uart):
    """Receives 8N1 bytes on ``rx`` (sampled mid-bit, after a 2-flop synchronizer).

    A byte whose stop bit is 0 is dropped and pulses ``framing_error``; a byte that
    arrives while the previous one still waits on ``data`` is dropped and pulses
    ``overrun``.
    """

    rx: In(1, init=1)
    data: Out(stream.Signature(8))
    framing_error: Out(1)
    overrun: Out(1)

    def elaborate(self, platform):
        m = Module()
        divisor = self._divisor
        rx = Signal(init=1)
        m.submodules.sync = FFSynchronizer(self.rx, rx, init=1)
        timer = Signal(range(divisor + divisor // 2 + 1))
        bits = Signal(range(9))
        shift = Signal(8)
        with m.If(self.data.ready):
            m.d.sync += self.data.valid.eq(0)
        m.d.sync += [self.framing_error.eq(0), self.overrun.eq(0)]
        with m.FSM():
            with m.State("IDLE"):
                with m.If(~rx):
                    # Wait to the middle of the start bit.
                    m.d.sync += timer.eq(divisor // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Elif(rx):  # a glitch, not a start bit
                    m.next = "IDLE"
                with m.Else():
                    m.d.sync += [timer.eq(divisor - 1), bits.eq(0)]
                    m.next = "DATA"
            with m.State("DATA"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Else():
                    m.d.sync += [shift.eq(Cat(shift[1:], rx)),  # LSB first
                                 timer.eq(divisor - 1), bits.eq(bits + 1)]
                    with m.If(bits == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                with m.If(timer != 0):
                    m.d.sync += timer.eq(timer - 1)
                with m.Else():
                    with m.If(~rx):
                        m.d.sync += self.framing_error.eq(1)
                    with m.Elif(self.data.valid & ~self.data.ready):
                        m.d.sync += self.overrun.eq(1)
                    with m.Else():
                        m.d.sync += [self.data.payload.eq(shift), self.data.valid.eq(1)]
                    m.next = "IDLE"
        return m


class UartTx(_Uart):
    """Sends the bytes of ``data`` as 8N1 on ``tx``."""

    data: In(stream.Signature(8))
    tx: Out(1, init=1)

    def elaborate(self, platform):
        m = Module()
        divisor = self._divisor
        timer = Signal(range(divisor))
        bits = Signal(range(11))
        shift = Signal(9)
        # Ready once the stop bit has lasted a whole bit time: bits == 0 and timer == 0,
        # kept in a register (set the cycle the timer runs out after the stop bit), so
        # that the sender's decision to send starts from a flip-flop.
        ready = Signal(init=1)
        m.d.comb += self.data.ready.eq(ready)
        with m.If(timer != 0):
            m.d.sync += [timer.eq(timer - 1), ready.eq((bits == 0) & (timer == 1))]
        with m.Elif(bits != 0):
            # The timer restarts (divisor >= 4): not ready before it runs out.
            m.d.sync += [self.tx.eq(shift[0]), shift.eq(shift >> 1), bits.eq(bits - 1),
                         timer.eq(divisor - 1), ready.eq(0)]
        with m.Elif(self.data.valid):
            # The start bit goes out at once; then eight data bits LSB first, the stop bit.
            m.d.sync += [self.tx.eq(0), shift.eq((1 << 8) | self.data.payload), bits.eq(9),
                         timer.eq(divisor - 1), ready.eq(0)]
        return m
