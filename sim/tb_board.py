"""cocotb bridge of the virtual board: UART bytes ⇄ a TCP socket on 127.0.0.1.

Bytes from the client go into the board's host-side FIFO and cross the SoC's UART as
bit streams; bytes the SoC sends come back the same way. One client at a time: another
that connects meanwhile gets a BUSY answer (command 0) to each of its requests until it
disconnects; a disconnect just waits for the next client. Environment: NPUGEN_PORT (0:
any free port), NPUGEN_PORT_FILE (where the bound port is written), NPUGEN_STOP_FILE
(created to stop).
"""

import os
import select
import socket

import cocotb
from cocotb.triggers import ClockCycles, FallingEdge, Timer

from npugen.protocol import TRUNCATION_BYTE_TIMES, LinkStatus, encode_response
from npugen.sim.board import SIM_DIVISOR
from npugen.sim.common import CLOCK_PERIOD_NS

POLL_CYCLES = 2000
# Simulate on for longer than the device's truncation timeout before idling, so a
# truncated frame is always dropped.
IDLE_POLLS = TRUNCATION_BYTE_TIMES * 10 * SIM_DIVISOR // POLL_CYCLES + 20
CHUNK = 4096
#: What a client that connects while another is served reads before its connection closes.
BUSY_ANSWER = encode_response(0, 0, LinkStatus.BUSY)


def _listen(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1)
    listener.setblocking(False)
    return listener


async def _push(dut, data: bytearray) -> None:
    """Move bytes from ``data`` into the device FIFO while it has room."""
    await FallingEdge(dut.clk)
    while data and int(dut.to_device__ready.value):
        dut.to_device__payload.value = data[0]
        dut.to_device__valid.value = 1
        del data[0]
        await FallingEdge(dut.clk)
    dut.to_device__valid.value = 0


async def _pull(dut) -> bytes:
    count = int(dut.from_device_level.value)
    out = bytearray()
    if not count:
        return bytes(out)
    await FallingEdge(dut.clk)
    for _ in range(count):
        out.append(int(dut.from_device__payload.value))
        dut.from_device__ready.value = 1
        await FallingEdge(dut.clk)
    dut.from_device__ready.value = 0
    return bytes(out)


def _turn_away(listener: socket.socket, waiting: list[socket.socket]) -> None:
    """Answer a client that connects while another is served with BUSY."""
    try:
        extra, _ = listener.accept()
        extra.setblocking(False)
        extra.sendall(BUSY_ANSWER)
        waiting.append(extra)
    except OSError:
        pass


def _answer_turned_away(waiting: list[socket.socket]) -> None:
    """BUSY to each request of the clients turned away, until they close (closing first
    would lose the answer in a connection reset)."""
    for extra in list(waiting):
        try:
            data = extra.recv(CHUNK)
            if data:
                extra.sendall(BUSY_ANSWER)
                continue
        except BlockingIOError:
            continue
        except OSError:
            pass
        extra.close()
        waiting.remove(extra)


@cocotb.test()
async def serve(dut):
    listener = _listen(int(os.environ.get("NPUGEN_PORT", "0")))
    port_file = os.environ["NPUGEN_PORT_FILE"]
    stop_file = os.environ["NPUGEN_STOP_FILE"]
    parent = os.getppid()
    dut.to_device__valid.value = 0
    dut.from_device__ready.value = 0
    dut.rst.value = 1
    await ClockCycles(dut.clk, 4)
    dut.rst.value = 0
    with open(port_file + ".tmp", "w") as f:
        f.write(str(listener.getsockname()[1]))
    os.replace(port_file + ".tmp", port_file)

    client = None
    turned_away: list[socket.socket] = []
    pending = bytearray()
    quiet = 0
    while not os.path.exists(stop_file) and os.getppid() == parent:
        if client is None:
            try:
                client, _ = listener.accept()
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except BlockingIOError:
                pass
        else:
            _turn_away(listener, turned_away)
        _answer_turned_away(turned_away)
        moved = False
        if client is not None:
            try:
                data = client.recv(CHUNK)
                if data:
                    pending += data
                else:  # the client closed: wait for the next one
                    client.close()
                    client = None
            except BlockingIOError:
                pass
            except OSError:
                client = None
        if pending:
            await _push(dut, pending)
            moved = True
        out = await _pull(dut)
        if out:
            moved = True
            if client is not None:
                try:
                    client.setblocking(True)
                    client.sendall(out)
                    client.setblocking(False)
                except OSError:
                    client = None
        busy = moved or pending or int(dut.running.value)
        quiet = 0 if busy else quiet + 1
        if quiet > IDLE_POLLS:
            # Nothing in flight: wait for the host instead of simulating an idle board.
            waiting = [listener] if client is None else [client]
            select.select(waiting, [], [], 0.02)
            await Timer(10 * CLOCK_PERIOD_NS, unit="ns")
        else:
            await Timer(POLL_CYCLES * CLOCK_PERIOD_NS, unit="ns")
    for extra in [client, *turned_away]:
        if extra is not None:
            extra.close()
    listener.close()
