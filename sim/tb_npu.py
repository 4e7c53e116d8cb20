"""cocotb testbench of the whole NPU: loads memories over the host port, starts the
sequencer and awaits ``done`` (no Python per clock cycle while the NPU runs), reads back.

The jobs come from the file named by ``NPUGEN_JOBS`` (see :mod:`npugen.sim.runner`);
the results go to ``NPUGEN_RESULTS``.
"""

import os
import time

import cocotb
import numpy as np
from cocotb.triggers import ClockCycles, FallingEdge, First, RisingEdge, Timer

from npugen.hostops import BusProgram, execute
from npugen.sim.common import CLOCK_PERIOD_NS as CLOCK_NS


class CocotbBus:
    """The host port driven from cocotb, one request a cycle on the falling edge."""

    def __init__(self, dut):
        self.dut = dut
        self.run_seconds = 0.0  # wall time while the NPU runs on its own

    async def write_many(self, addresses, words):
        dut = self.dut
        for addr, word in zip(addresses.tolist(), words.tolist(), strict=True):
            await FallingEdge(dut.clk)
            dut.host__valid.value = 1
            dut.host__write.value = 1
            dut.host__addr.value = addr
            dut.host__wdata.value = word
        await FallingEdge(dut.clk)
        dut.host__valid.value = 0
        dut.host__write.value = 0

    async def read_many(self, addresses):
        # Pipelined: at each falling edge, take the answer rvalid marks and set the next
        # read; answers come HOST_READ_LATENCY cycles after their requests, in order.
        dut = self.dut
        words = []
        dut.host__write.value = 0
        pending = addresses.tolist()
        while len(words) < len(addresses):
            await FallingEdge(dut.clk)
            if int(dut.host__rvalid.value):
                words.append(int(dut.host__rdata.value))
            dut.host__valid.value = 1 if pending else 0
            if pending:
                dut.host__addr.value = pending.pop(0)
        dut.host__valid.value = 0
        return words

    async def wait_done(self, timeout_cycles):
        dut = self.dut
        started = time.perf_counter()
        if not int(dut.done.value):
            # One Timer, not ClockCycles: no Python runs per clock while the NPU works.
            await First(RisingEdge(dut.done), Timer(timeout_cycles * CLOCK_NS, unit="ns"))
        self.run_seconds = time.perf_counter() - started
        return bool(int(dut.done.value))


@cocotb.test()
async def run_jobs(dut):
    jobs = np.load(os.environ["NPUGEN_JOBS"])  # the wrapper npu_tb makes the clock
    dut.host__valid.value = 0
    dut.host__write.value = 0
    dut.host__addr.value = 0
    dut.host__wdata.value = 0
    dut.rst.value = 1
    await ClockCycles(dut.clk, 2)
    dut.rst.value = 0
    bus = CocotbBus(dut)
    results = {}
    for index in range(int(jobs["count"])):
        program = BusProgram(jobs[f"waddr{index}"], jobs[f"wdata{index}"],
                             int(jobs[f"start{index}"]), jobs[f"raddr{index}"],
                             int(jobs[f"timeout{index}"]))
        status, counters, words = await execute(bus, program)
        results[f"status{index}"] = np.array(status)
        results[f"counters{index}"] = np.array(counters, dtype=np.uint64)
        results[f"rdata{index}"] = np.array(words, dtype=np.uint64)
        results[f"run_seconds{index}"] = np.array(bus.run_seconds)
    np.savez(os.environ["NPUGEN_RESULTS"], **results)
