"""UART receiver and transmitter in Amaranth's simulator, and the baud check."""

import pytest
from amaranth import Module
from amaranth.sim import Simulator

from npugen.hw.uart import UartRx, UartTx
from npugen.protocol import uart_divisor

DIVISOR = 6


def test_loopback_bytes_and_bit_timing():
    m = Module()
    m.submodules.tx = tx = UartTx(divisor=DIVISOR)
    m.submodules.rx = rx = UartRx(divisor=DIVISOR)
    m.d.comb += rx.rx.eq(tx.tx)
    sent = [0x00, 0xFF, 0xA5, 0x5A, 0x01, 0x80, 0x3C]
    received, line = [], []

    async def sender(ctx):
        for byte in sent:
            ctx.set(tx.data.payload, byte)
            ctx.set(tx.data.valid, 1)
            await ctx.tick().until(tx.data.ready)
        ctx.set(tx.data.valid, 0)

    async def receiver(ctx):
        ctx.set(rx.data.ready, 1)
        for _ in range(len(sent) * 10 * DIVISOR + 200):
            line.append(ctx.get(tx.tx))
            if ctx.get(rx.data.valid):
                received.append(ctx.get(rx.data.payload))
            assert not ctx.get(rx.framing_error)
            await ctx.tick()

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(sender)
    sim.add_testbench(receiver)
    sim.run()
    assert received == sent
    # Back-to-back bytes: exactly 10 bit times each, start bit first.
    first_start = line.index(0)
    bits = [line[first_start + DIVISOR // 2 + i * DIVISOR] for i in range(10 * len(sent))]
    expected = []
    for byte in sent:
        expected += [0] + [(byte >> i) & 1 for i in range(8)] + [1]
    assert bits == expected


def drive_bits(ctx, rx, bits):
    async def run():
        for bit in bits:
            ctx.set(rx.rx, bit)
            await ctx.tick().repeat(DIVISOR)
    return run()


def test_framing_error_and_glitch():
    rx = UartRx(divisor=DIVISOR)
    seen = {"bytes": [], "framing": 0}

    async def testbench(ctx):
        ctx.set(rx.data.ready, 1)
        ctx.set(rx.rx, 1)
        await ctx.tick().repeat(5)
        ctx.set(rx.rx, 0)          # a one-cycle glitch is not a start bit
        await ctx.tick()
        ctx.set(rx.rx, 1)
        await ctx.tick().repeat(3 * DIVISOR)
        # 0x42 with a stop bit of 0: dropped, framing error.
        await drive_bits(ctx, rx, [0] + [(0x42 >> i) & 1 for i in range(8)] + [0, 1, 1])
        # 0x99 well formed.
        await drive_bits(ctx, rx, [0] + [(0x99 >> i) & 1 for i in range(8)] + [1, 1])

    async def monitor(ctx):
        for _ in range(40 * DIVISOR):
            if ctx.get(rx.data.valid):
                seen["bytes"].append(ctx.get(rx.data.payload))
            seen["framing"] += ctx.get(rx.framing_error)
            await ctx.tick()

    sim = Simulator(rx)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.add_testbench(monitor)
    sim.run()
    assert seen["bytes"] == [0x99]
    assert seen["framing"] == 1


def test_divisor_checks():
    assert uart_divisor(12e6, 115200) == 104
    with pytest.raises(ValueError, match="off by 3.5 %"):
        uart_divisor(1e6, 115200)
    with pytest.raises(ValueError, match="at least 4 clock cycles a bit"):
        uart_divisor(1e6, 500000)
    with pytest.raises(ValueError, match="divisor .* must be an integer of at least 4"):
        UartTx(divisor=2)
