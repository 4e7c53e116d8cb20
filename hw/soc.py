"""The SoC: the NPU behind the UART host link. Board tops and the virtual board wrap it."""

from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig
from ..memory_map import identity_words, region_words
from ..protocol import RX_FIFO_BYTES, TRUNCATION_BYTE_TIMES
from .implementation import GENERIC, Implementation, check_implementation
from .link import LinkEngine
from .npu import Npu
from .uart import UartRx, UartTx

__all__ = ["Soc"]


class Soc(wiring.Component):
    """NPU + UART (``divisor`` clock cycles a bit) + protocol engine; the NPU is built for
    ``implementation`` (default: the generic design).

    ``running``, ``done`` and ``link_error`` are meant for status LEDs.
    """

    uart_rx: In(1, init=1)
    uart_tx: Out(1, init=1)
    running: Out(1)
    done: Out(1)
    link_error: Out(1)

    def __init__(self, config: NpuConfig, *, divisor: int,
                 implementation: Implementation = GENERIC):
        self._config = config
        self._divisor = divisor
        self._implementation = check_implementation(implementation)
        self._timeout_cycles = TRUNCATION_BYTE_TIMES * 10 * divisor
        super().__init__()

    @property
    def config(self) -> NpuConfig:
        return self._config

    @property
    def implementation(self) -> Implementation:
        return self._implementation

    def elaborate(self, platform):
        m = Module()
        m.submodules.npu = npu = Npu(self._config, implementation=self._implementation)
        m.submodules.uart_rx = rx = UartRx(divisor=self._divisor)
        m.submodules.uart_tx = tx = UartTx(divisor=self._divisor)
        m.submodules.link = link = LinkEngine(
            identity_words=len(identity_words(self._config)),
            timeout_cycles=self._timeout_cycles, region_words=region_words(self._config),
            error_counters=self._config.link_error_counters)
        # Room for a whole request while the engine executes or answers the previous one,
        # so a host may send the next frame without waiting.
        m.submodules.rx_fifo = fifo = SyncFIFOBuffered(width=8, depth=RX_FIFO_BYTES)
        m.d.comb += [fifo.w_data.eq(rx.data.payload), fifo.w_en.eq(rx.data.valid),
                     rx.data.ready.eq(fifo.w_rdy)]
        # The FIFO's byte comes from a block RAM late in the cycle (an ECP5 DP16KD: 5.6 ns
        # from the clock), too late to decode the frame in the same cycle: the link
        # engine takes it from a register, refilled whenever it is taken or empty.
        rx_byte, rx_held = Signal(8), Signal()
        refill = link.rx.ready | ~rx_held
        with m.If(refill):
            m.d.sync += [rx_byte.eq(fifo.r_data), rx_held.eq(fifo.r_rdy)]
        m.d.comb += [fifo.r_en.eq(refill), link.rx.payload.eq(rx_byte),
                     link.rx.valid.eq(rx_held)]
        wiring.connect(m, link.tx, tx.data)
        wiring.connect(m, link.bus, npu.host)
        m.d.comb += [
            rx.rx.eq(self.uart_rx), self.uart_tx.eq(tx.tx),
            link.framing_error.eq(rx.framing_error), link.running.eq(npu.running),
            self.running.eq(npu.running), self.done.eq(npu.done),
            self.link_error.eq(link.error),
        ]
        return m
