"""Running a job over the NPU's host port, independent of what carries the bus.

A *bus* (:class:`Bus`) has ``async write_many(addresses, words)``, ``async
read_many(addresses)`` and ``async wait_done(timeout_cycles)``. The cocotb testbench
(sim/tb_npu.py) and the Amaranth testbench (sim/pysim.py) provide one; :func:`execute` is
the one order of operations both follow. The driver runs a job over the host link its own
way (START with a run token, STATUS polled) and reads the answers with
:func:`decode_result`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .golden import Counters
from .job import Job, JobResult, counters_from_words
from .memory_map import COUNTER_NAMES, Control, Reg, Region, Status, address

__all__ = ["Bus", "BusProgram", "bus_program", "execute", "decode_result", "NpuRunError"]


class NpuRunError(RuntimeError):
    """The NPU did not finish a run normally."""


class Bus(Protocol):
    """The NPU's host port, as a testbench drives it (sim/tb_npu.py, sim/pysim.py).

    ``write_many`` writes each word to its address, in order; ``read_many`` returns the
    words at ``addresses``, in order; ``wait_done`` waits until the NPU signals ``done`` or
    ``timeout_cycles`` clock cycles have passed, and returns whether it is done."""

    async def write_many(self, addresses: np.ndarray, words: np.ndarray) -> None: ...
    async def read_many(self, addresses: np.ndarray) -> list[int]: ...
    async def wait_done(self, timeout_cycles: int) -> bool: ...


STATUS_ADDRESS = address(Region.REGISTERS, Reg.STATUS)
COUNTER_ADDRESSES = np.array(
    [address(Region.REGISTERS, Reg.COUNTERS + i) for i in range(2 * len(COUNTER_NAMES))],
    dtype=np.uint32)


class BusProgram:
    """A job flattened to bus operations: writes, start, reads."""

    def __init__(self, write_addresses, write_words, start_pc: int, read_addresses,
                 timeout_cycles: int):
        self.write_addresses = np.asarray(write_addresses, dtype=np.uint32)
        self.write_words = np.asarray(write_words, dtype=np.uint32)
        self.start_pc = int(start_pc)
        self.read_addresses = np.asarray(read_addresses, dtype=np.uint32)
        self.timeout_cycles = int(timeout_cycles)


def bus_program(job: Job, timeout_cycles: int = 50_000_000) -> BusProgram:
    """``job`` as bus operations: every host write that loads it, its start address, the
    addresses it reads back (``job.reads`` in order), and ``timeout_cycles``, the clock
    cycles :func:`execute` waits for HALT before it aborts the run.

    Raises ``ValueError`` if a value written does not fit its lane
    (:func:`~npugen.job.pack_entries`)."""
    addresses, words = job.host_writes()
    reads = [job.read_addresses(name) for name in job.reads]
    reads = np.concatenate(reads) if reads else np.zeros(0, np.uint32)
    return BusProgram(addresses, words, job.start_pc, reads, timeout_cycles)


async def execute(bus: Bus, program: BusProgram) -> tuple[int, list[int], list[int]]:
    """Load, start, wait for HALT, read back. Returns (status, counter words, read words).

    Raises :class:`NpuRunError` if the run does not finish within the program's
    ``timeout_cycles`` (after aborting it, so the NPU is idle again)."""
    await bus.write_many(program.write_addresses, program.write_words)
    await bus.write_many(
        np.array([address(Region.REGISTERS, Reg.START_PC),
                  address(Region.REGISTERS, Reg.CONTROL)], dtype=np.uint32),
        np.array([program.start_pc, int(Control.START)], dtype=np.uint32))
    finished = await bus.wait_done(program.timeout_cycles)
    if not finished:
        await bus.write_many(np.array([address(Region.REGISTERS, Reg.CONTROL)], np.uint32),
                             np.array([int(Control.ABORT)], np.uint32))
        raise NpuRunError(f"the NPU did not reach HALT within {program.timeout_cycles} "
                          f"cycles and was aborted; raise the program's timeout_cycles if "
                          f"the job is that long")
    status = (await bus.read_many(np.array([STATUS_ADDRESS], np.uint32)))[0]
    counters = await bus.read_many(COUNTER_ADDRESSES)
    words = await bus.read_many(program.read_addresses) if len(program.read_addresses) else []
    return int(status), [int(w) for w in counters], [int(w) for w in words]


def decode_result(job: Job, status: int, counter_words: list[int],
                  words: list[int]) -> JobResult:
    """The :class:`~npugen.job.JobResult` of ``job`` from a run's answers: the STATUS word,
    the counter words (two a counter, low word first) and the words read back, in the
    order :func:`bus_program` reads them.

    Raises :class:`NpuRunError` if STATUS lacks DONE (the run stopped before HALT: it was
    aborted, timed out or met an illegal instruction) or has HOST_CONFLICT."""
    status = Status(status)
    if Status.DONE not in status:
        raise NpuRunError(f"the NPU did not reach HALT (status {status!r})")
    if Status.HOST_CONFLICT in status:
        raise NpuRunError("the host accessed a memory during the run")
    counters: Counters = counters_from_words(counter_words, job.config)
    outputs, position = {}, 0
    for name in job.reads:
        count = len(job.read_addresses(name))
        outputs[name] = job.decode_read(name, np.array(words[position:position + count]))
        position += count
    return JobResult(outputs, counters)
