"""The virtual board: the SoC with a host-side UART and byte FIFOs, for simulation.

The host side (the cocotb bridge of ``serve-sim``) pushes bytes into ``to_device`` and
pops them from ``from_device``; they cross the SoC's real UART receiver and
transmitter as 8N1 bit streams.
"""

from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig
from ..hw.implementation import GENERIC, Implementation
from ..hw.soc import Soc
from ..hw.uart import UartRx, UartTx

__all__ = ["VirtualBoard", "SIM_DIVISOR", "FIFO_DEPTH"]

#: Clock cycles per UART bit in simulation (a real board divides its clock to the baud).
SIM_DIVISOR = 4
FIFO_DEPTH = 4096


class VirtualBoard(wiring.Component):
    """The SoC of ``config`` (UART ``divisor`` clock cycles a bit), built for
    ``implementation``, with its host side. ``soc``: a component with the SoC's ports to
    use instead, such as the synthesized netlist (:class:`npugen.sim.netlist.SocNetlist`)."""

    to_device: In(stream.Signature(8))
    from_device: Out(stream.Signature(8))
    from_device_level: Out(range(FIFO_DEPTH + 1))
    running: Out(1)
    link_error: Out(1)

    def __init__(self, config: NpuConfig, *, divisor: int = SIM_DIVISOR,
                 soc: wiring.Component | None = None,
                 implementation: Implementation = GENERIC):
        self._config = config
        self._divisor = divisor
        self._soc = soc
        self._implementation = implementation
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        soc = self._soc if self._soc is not None else Soc(
            self._config, divisor=self._divisor, implementation=self._implementation)
        m.submodules.soc = soc
        m.submodules.host_tx = host_tx = UartTx(divisor=self._divisor)
        m.submodules.host_rx = host_rx = UartRx(divisor=self._divisor)
        m.submodules.tx_fifo = tx_fifo = SyncFIFO(width=8, depth=FIFO_DEPTH)
        m.submodules.rx_fifo = rx_fifo = SyncFIFO(width=8, depth=FIFO_DEPTH)
        m.d.comb += [
            tx_fifo.w_data.eq(self.to_device.payload), tx_fifo.w_en.eq(self.to_device.valid),
            self.to_device.ready.eq(tx_fifo.w_rdy),
            host_tx.data.payload.eq(tx_fifo.r_data), host_tx.data.valid.eq(tx_fifo.r_rdy),
            tx_fifo.r_en.eq(host_tx.data.ready),
            soc.uart_rx.eq(host_tx.tx), host_rx.rx.eq(soc.uart_tx),
            rx_fifo.w_data.eq(host_rx.data.payload), rx_fifo.w_en.eq(host_rx.data.valid),
            host_rx.data.ready.eq(rx_fifo.w_rdy),
            self.from_device.payload.eq(rx_fifo.r_data),
            self.from_device.valid.eq(rx_fifo.r_rdy), rx_fifo.r_en.eq(self.from_device.ready),
            self.from_device_level.eq(rx_fifo.r_level),
            self.running.eq(soc.running), self.link_error.eq(soc.link_error),
        ]
        return m
