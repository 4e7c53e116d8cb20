"""The SoC: the NPU behind the UART host link. Board tops and the virtual board wrap it."""

from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig
from ..memory_map import identity_words
from .link import LinkEngine
from .npu import Npu
from .uart import UartRx, UartTx

__all__ = ["Soc"]


class Soc(wiring.Component):
    """NPU + UART (``divisor`` clock cycles a bit) + protocol engine.

    ``running``, ``done`` and ``link_error`` are meant for status LEDs.
    """

    uart_rx: In(1, init=1)
    uart_tx: Out(1, init=1)
    running: Out(1)
    done: Out(1)
    link_error: Out(1)

    def __init__(self, config: NpuConfig, *, divisor: int):
        self._config = config
        self._divisor = divisor
        # A frame is truncated when no byte comes for 20 byte times.
        self._timeout_cycles = 200 * divisor
        super().__init__()

    @property
    def config(self) -> NpuConfig:
        return self._config

    def elaborate(self, platform):
        m = Module()
        m.submodules.npu = npu = Npu(self._config)
        m.submodules.uart_rx = rx = UartRx(divisor=self._divisor)
        m.submodules.uart_tx = tx = UartTx(divisor=self._divisor)
        m.submodules.link = link = LinkEngine(
            identity_words=len(identity_words(self._config)),
            timeout_cycles=self._timeout_cycles)
        wiring.connect(m, rx.data, link.rx)
        wiring.connect(m, link.tx, tx.data)
        wiring.connect(m, link.bus, npu.host)
        m.d.comb += [
            rx.rx.eq(self.uart_rx), self.uart_tx.eq(tx.tx),
            link.framing_error.eq(rx.framing_error),
            self.running.eq(npu.running), self.done.eq(npu.done),
            self.link_error.eq(link.error),
        ]
        return m
