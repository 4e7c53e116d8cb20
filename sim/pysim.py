"""Run jobs on the NPU in Amaranth's own Python simulator: no Verilog, no build step.

Same contract as :func:`npugen.sim.runner.simulate` (one config, one simulation, each job
starting from the state the previous one left); the host port is driven by
:class:`AmaranthBus` through :func:`npugen.hostops.execute`. Slower per cycle than
Verilator, but nothing to install or compile.
"""

from __future__ import annotations

import time

import numpy as np
from amaranth import Cat
from amaranth.sim import Simulator

from ..hostops import bus_program, decode_result, execute
from ..job import Job, JobResult
from .common import CLOCK_PERIOD_NS, job_config

__all__ = ["AmaranthBus", "simulate_amaranth"]

CLOCK_PERIOD_S = CLOCK_PERIOD_NS * 1e-9


class AmaranthBus:
    """The NPU's host port driven from an Amaranth testbench (a ``npugen.hostops.Bus``):
    one request a cycle; a read's data is sampled the cycle after its request."""

    def __init__(self, ctx, npu):
        self.ctx = ctx
        self.npu = npu
        host = npu.host
        # One assignment a cycle, not four: each ctx.set settles the whole design.
        self._request = Cat(host.valid, host.write, host.addr, host.wdata)
        self.run_seconds = 0.0  # wall time while the NPU runs on its own

    async def write_many(self, addresses: np.ndarray, words: np.ndarray) -> None:
        ctx, request = self.ctx, self._request
        for addr, word in zip(np.asarray(addresses).tolist(), np.asarray(words).tolist(),
                              strict=True):
            ctx.set(request, 0b11 | addr << 2 | word << 34)
            await ctx.tick()
        ctx.set(request, 0)

    async def read_many(self, addresses: np.ndarray) -> list[int]:
        # Pipelined: one request each cycle; after each edge, take the answer rvalid
        # marks (HOST_READ_LATENCY cycles after its request).
        ctx, request, host = self.ctx, self._request, self.npu.host
        pending, words = np.asarray(addresses).tolist(), []
        while len(words) < len(addresses):
            ctx.set(request, 0b01 | pending.pop(0) << 2 if pending else 0)
            await ctx.tick()
            if ctx.get(host.rvalid):
                words.append(ctx.get(host.rdata))
        ctx.set(request, 0)
        return words

    async def wait_done(self, timeout_cycles: int) -> bool:
        """Wait for ``done`` without waking this testbench every cycle, at most
        ``timeout_cycles``; return whether the NPU is done."""
        ctx, done = self.ctx, self.npu.done
        started = time.perf_counter()
        if not ctx.get(done):
            # Half a period more: a timeout wakes between edges, never on one.
            await ctx.posedge(done).delay((timeout_cycles + 0.5) * CLOCK_PERIOD_S)
        self.run_seconds = time.perf_counter() - started
        return bool(ctx.get(done))


def simulate_amaranth(jobs: list[Job]) -> list[JobResult]:
    """Run ``jobs`` (one config) in one Amaranth simulation; return their results in order.

    Raises ``ValueError`` if the jobs' configs differ, and
    :class:`~npugen.hostops.NpuRunError` if a job does not finish within its program's
    timeout or stops abnormally.
    """
    if not jobs:
        return []
    from ..hw import Npu
    from ..hw.implementation import Implementation

    npu = Npu(job_config(jobs), implementation=Implementation(poison_collisions=True))
    programs = [bus_program(job) for job in jobs]
    raw: list[tuple[int, list[int], list[int], float]] = []

    async def testbench(ctx) -> None:
        bus = AmaranthBus(ctx, npu)
        for program in programs:
            status, counters, words = await execute(bus, program)
            raw.append((status, counters, words, bus.run_seconds))

    simulator = Simulator(npu)
    simulator.add_clock(CLOCK_PERIOD_S)
    simulator.add_testbench(testbench)
    simulator.run()
    results = []
    for job, (status, counters, words, run_seconds) in zip(jobs, raw, strict=True):
        result = decode_result(job, status, counters, words)
        result.run_seconds = run_seconds
        results.append(result)
    return results
