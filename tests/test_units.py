"""The NPU's units, each alone in Amaranth's simulator against the golden model's view
of it: what it computes (:class:`npugen.golden.GoldenNpu`) and how many cycles it holds
the sequencer (:class:`npugen.golden.CycleModel`, ``sw/timing.py``).

The testbenches stand in for the memories: a unit's read request is answered the cycle
after (random words when it asks for nothing, so that a unit reading an answer it did not
ask for fails), its write requests are applied lane by lane.
"""

from __future__ import annotations

import numpy as np
import pytest
from amaranth.sim import Simulator

from npugen.config import NpuConfig
from npugen.golden import Counters, CycleModel, GemmState, GoldenNpu, check_program, expand_program
from npugen.hw.accumulate import AccumulatePath
from npugen.hw.array import psum_width
from npugen.hw.counters import PerformanceCounters
from npugen.hw.feeder import Feeder
from npugen.hw.host_port import HostPort
from npugen.hw.requant_unit import RequantUnit
from npugen.hw.rescale_unit import RescaleUnit
from npugen.hw.sequencer import STEP_FIELDS, Sequencer
from npugen.hw.weight_loader import WeightLoader
from npugen.isa import Instruction, Opcode, encode_program
from npugen.job import counters_from_words, pack_entries, unpack_entries
from npugen.memory_map import (
    COUNTER_BITS,
    COUNTER_NAMES,
    Control,
    Reg,
    Region,
    Status,
    address,
    host_read_latency,
    identity_words,
    memories,
)
from npugen.timing import (
    REQUANT_TAIL_CYCLES,
    REQUANT_TO_ACC_TAIL_CYCLES,
    RESCALE_TAIL_CYCLES,
    TABLE_TAIL_CYCLES,
    WEIGHT_LOAD_STAGES,
    array_latency,
    load_next_cycles,
    requant_cycles,
    requant_waits_for_feed,
    results_written_cycles,
    weight_load_cycles,
)

SMALL = dict(activation_depth=64, weight_depth=64, accumulator_depth=64, instruction_depth=16,
             param_depth=32)


def simulate(dut, testbench) -> None:
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()


def encode(instruction: Instruction) -> int:
    return int(encode_program([instruction])[0])


class Memory:
    """One of the NPU's memories as whole entries (ints), packed as the host packs them."""

    def __init__(self, config: NpuConfig, region: Region, values: np.ndarray):
        self.config, self.region = config, region
        self.info = memories(config)[region]
        words = pack_entries(config, region, values)
        self.entries = [sum(int(w) << (32 * i) for i, w in enumerate(entry)) for entry in words]

    def values(self) -> np.ndarray:
        stride = self.info.stride
        words = np.array([[(entry >> (32 * i)) & 0xFFFFFFFF for i in range(stride)]
                          for entry in self.entries], dtype=np.uint64)
        return unpack_entries(self.config, self.region, words)

    def write(self, addr: int, data: int, en: int) -> None:
        lane_bits = self.info.granularity
        for lane in range(self.info.width // lane_bits):
            if en >> lane & 1:
                mask = ((1 << lane_bits) - 1) << (lane * lane_bits)
                self.entries[addr] = (self.entries[addr] & ~mask) | (data & mask)


# -- Requantization unit ---------------------------------------------------------------------

def requant_state(config: NpuConfig, rng: np.random.Generator) -> GoldenNpu:
    """A golden NPU with random accumulators, parameters and activations."""
    golden = GoldenNpu(config)
    c = config
    reach = 1 << min(24, c.accumulator_width - 1)
    golden.accumulators[:] = rng.integers(-reach, reach, golden.accumulators.shape)
    shape = golden.params.shape[:2]
    golden.params[..., 0] = rng.integers(-(1 << 16), 1 << 16, shape)           # bias
    golden.params[..., 1] = rng.integers(1 << 30, (1 << 31) - 1, shape)        # multiplier
    golden.params[..., 2] = rng.integers(0, 20, shape)                         # shift
    golden.activations[:] = rng.integers(-(1 << (c.input_width - 1)),
                                         1 << (c.input_width - 1), golden.activations.shape)
    return golden


async def tick_with_memories(ctx, unit, ports: list, injected: list,
                             rng: np.random.Generator) -> None:
    """One clock edge of ``unit``: the rows it sends down the accumulate path collected
    into ``injected`` as (word, accumulate, row), and each of its read ``ports`` (with
    the :class:`Memory` behind it) answered the cycle after, random words when it asked
    for nothing (a unit reading an answer it did not ask for then fails)."""
    reads = [(port, memory, ctx.get(port.valid), ctx.get(port.addr))
             for port, memory in ports]
    if ctx.get(unit.inject.valid):
        injected.append((ctx.get(unit.inject.addr), ctx.get(unit.inject.accumulate),
                         [ctx.get(row) for row in unit.inject_row]))
    await ctx.tick()
    for port, memory, valid, addr in reads:
        width = memory.info.width
        garbage = int.from_bytes(rng.bytes(-(-width // 8)), "little") % (1 << width)
        ctx.set(port.data, memory.entries[addr] if valid else garbage)


def run_requant_unit(config: NpuConfig, golden: GoldenNpu, program: list[Instruction],
                     rng: np.random.Generator, *, drain_wait: int = 0):
    """Run ``program`` (SETPP, SETREQ, SETOUT, then one REQUANT, each dispatched a cycle
    after the last) on a RequantUnit over memories holding ``golden``'s state, the
    feeder's ``drain_wait`` (and ``drained``) as given in the REQUANT's dispatch cycle and
    random after. Returns the memories after the run, the cycles from the REQUANT's
    dispatch to the first in which ``active`` is low again, and the rows it injected into
    the accumulate path."""
    unit = RequantUnit(config)
    acc = Memory(config, Region.ACCUMULATORS, golden.accumulators)
    params = Memory(config, Region.PARAMS, golden.params)
    act = Memory(config, Region.ACTIVATIONS, golden.activations)
    injected = []
    result = {}
    strobes = {Opcode.SETPP: unit.set_pp, Opcode.SETREQ: unit.set_req,
               Opcode.SETOUT: unit.set_out, Opcode.REQUANT: unit.dispatch}

    async def cycle(ctx):
        """One clock edge with the memories answering and writing."""
        if ctx.get(unit.act_write.valid):
            act.write(ctx.get(unit.act_write.addr), ctx.get(unit.act_write.data),
                      ctx.get(unit.act_write.en))
        await tick_with_memories(ctx, unit, [(unit.acc_read, acc), (unit.param_read, params)],
                                 injected, rng)

    async def testbench(ctx):
        ctx.set(unit.running, 1)
        ctx.set(unit.run_start, 1)
        await cycle(ctx)
        ctx.set(unit.run_start, 0)
        for instruction in program:
            assert not ctx.get(unit.active)
            ctx.set(unit.instruction, encode(instruction))
            ctx.set(strobes[instruction.opcode], 1)
            ctx.set(unit.drain_wait, drain_wait)
            ctx.set(unit.drained, drain_wait == 0)
            await cycle(ctx)
            ctx.set(strobes[instruction.opcode], 0)
            # The sequencer moves on to the next instruction, and the feeder to the next
            # stream: the unit must not need either.
            ctx.set(unit.instruction, encode(Instruction(Opcode.HALT)) | 0xFFFF_FFFF << 32)
            ctx.set(unit.drain_wait, int(rng.integers(0, 100)))
            ctx.set(unit.drained, int(rng.integers(0, 2)))
        busy = 1
        while ctx.get(unit.active):
            await cycle(ctx)
            busy += 1
        for _ in range(8):  # nothing may be written once it is idle
            await cycle(ctx)
        result["busy"] = busy

    simulate(unit, testbench)
    return {"acc": acc, "params": params, "act": act}, result["busy"], injected


REQUANT_CONFIGS = {
    "2x2": NpuConfig(rows=2, cols=2, requant_lanes=1, feature_maps=False, **SMALL),
    "4x4-lanes2": NpuConfig(rows=4, cols=4, requant_lanes=2, **SMALL),
    "4x8-lanes4-both": NpuConfig(rows=4, cols=8, requant_lanes=4, rounding="both", **SMALL),
    # Serial products (the UP5K's): 32 cycles a group; 2 (five groups in the lanes at
    # once); 8 cycles with a 24-bit accumulator's three digits.
    "2x2-serial1": NpuConfig(rows=2, cols=2, requant_lanes=1, feature_maps=False,
                             requant_serial_bits=1, **SMALL),
    "4x4-lanes2-serial16": NpuConfig(rows=4, cols=4, requant_lanes=2, adds=False,
                                     requant_serial_bits=16, **SMALL),
    "4x8-lanes2-both-serial3": NpuConfig(rows=4, cols=8, requant_lanes=2, adds=False,
                                         accumulator_width=24, rounding="both",
                                         requant_serial_bits=3, **SMALL),
}


@pytest.mark.parametrize("name", list(REQUANT_CONFIGS))
@pytest.mark.parametrize("seed", [1, 2, 3])   # seeds 1 and 2 give the 2x2 one word, 3 five
def test_requant_unit_matches_golden_and_cycle_model(name, seed):
    """Random accumulators, parameters, zero point, clamps, output lane, stride and count:
    every activation lane the unit writes (and those it must leave alone) equals the
    golden model's, and ``active`` holds the sequencer for ``requant_cycles`` from the
    dispatch (``groups + REQUANT_TAIL_CYCLES`` with products in DSP blocks)."""
    c = REQUANT_CONFIGS[name]
    rng = np.random.default_rng(seed)
    golden = requant_state(c, rng)
    count = int(rng.integers(1, 6))
    requant = {"acc_addr": int(rng.integers(0, 20)), "out_addr": int(rng.integers(0, 20)),
               "count": count,
               "out_lane": c.requant_lanes * int(rng.integers(0, c.rows // c.requant_lanes))}
    if c.rounding == "both":
        requant["single_rounding"] = int(rng.integers(0, 2))
    low = int(rng.integers(-128, 0))
    program = [
        Instruction(Opcode.SETPP, {"zero_point": int(rng.integers(-20, 20)),
                                   "clamp_min": low, "clamp_max": int(rng.integers(low, 128))}),
        Instruction(Opcode.SETREQ, {"param_addr": int(rng.integers(0, 8)),
                                    "out_stride": int(rng.integers(1, 8))}),
        Instruction(Opcode.REQUANT, requant),
    ]
    check_program(c, [*program, Instruction(Opcode.HALT)])
    memories_after, busy, injected = run_requant_unit(c, golden, program, rng)
    for instruction in program:
        golden.execute(instruction)
    np.testing.assert_array_equal(memories_after["act"].values(), golden.activations)
    assert injected == []
    groups = count * (c.cols // c.requant_lanes)
    assert busy == requant_cycles(groups, c.requant_product_cycles)
    if c.requant_product_cycles == 1:
        assert busy == groups + REQUANT_TAIL_CYCLES


@pytest.mark.parametrize("serial_bits", [0, 5])
@pytest.mark.parametrize("drain_wait", [1, 2, 17])
def test_requant_unit_dispatched_beside_the_feeder_starts_after_its_drain(drain_wait,
                                                                         serial_bits):
    """A REQUANT dispatched while the feeder's stream still drains (``requant_overlap``)
    waits the feeder's ``drain_wait`` and then runs as if dispatched then: the same
    outputs, and ``active`` ``drain_wait`` cycles longer (the cycle model's start)."""
    c = REQUANT_CONFIGS["4x8-lanes4-both"].replace(requant_overlap=True, adds=False,
                                                   requant_serial_bits=serial_bits)
    rng = np.random.default_rng(drain_wait)
    golden = requant_state(c, rng)
    program = [
        Instruction(Opcode.SETPP, {"zero_point": 5, "clamp_min": -100, "clamp_max": 90}),
        Instruction(Opcode.SETREQ, {"param_addr": 2, "out_stride": 1}),
        Instruction(Opcode.REQUANT, {"acc_addr": 4, "out_addr": 7, "count": 3,
                                     "out_lane": 0, "overlap": 1}),
    ]
    memories_after, busy, injected = run_requant_unit(c, golden, program, rng,
                                                      drain_wait=drain_wait)
    for instruction in program:
        golden.execute(instruction)
    np.testing.assert_array_equal(memories_after["act"].values(), golden.activations)
    assert injected == []
    assert busy == drain_wait + requant_cycles(3 * (c.cols // c.requant_lanes),
                                               c.requant_product_cycles)


def test_requant_unit_output_walk_follows_setout():
    """SETOUT (feature-map builds): the outputs go along rows of ``row_length`` words,
    ``row_step`` apart, where the golden model puts them."""
    c = REQUANT_CONFIGS["4x4-lanes2"]
    rng = np.random.default_rng(3)
    golden = requant_state(c, rng)
    program = [
        Instruction(Opcode.SETPP, {"zero_point": 3, "clamp_min": -128, "clamp_max": 127}),
        Instruction(Opcode.SETREQ, {"param_addr": 1, "out_stride": 1}),
        Instruction(Opcode.SETOUT, {"row_length": 2, "row_step": 5}),
        Instruction(Opcode.REQUANT, {"acc_addr": 2, "out_addr": 3, "count": 5,
                                     "out_lane": 0}),
    ]
    memories_after, busy, _ = run_requant_unit(c, golden, program, rng)
    for instruction in program:
        golden.execute(instruction)
        if instruction.opcode is Opcode.SETOUT:
            golden.state.expand(instruction)
    np.testing.assert_array_equal(memories_after["act"].values(), golden.activations)
    assert busy == 5 * 2 + REQUANT_TAIL_CYCLES


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("accumulate", [0, 1])
def test_requant_unit_to_acc_injects_raw_rows(accumulate, overlap):
    """REQUANT to_acc: each accumulator word's unclamped results leave as one row for the
    accumulate path, addressed to the golden model's destination word, with its
    ``accumulate`` flag; the activations are left alone; ``active`` covers the
    accumulate path's write too (``REQUANT_TO_ACC_TAIL_CYCLES`` after the last source
    read: every cycle with ``requant_overlap``, whose read port is the unit's own, else
    every other cycle)."""
    c = REQUANT_CONFIGS["4x4-lanes2"].replace(requant_overlap=overlap)
    rng = np.random.default_rng(4 + accumulate)
    golden = requant_state(c, rng)
    count = 3
    program = [
        Instruction(Opcode.SETPP, {"zero_point": -2, "clamp_min": -128, "clamp_max": 127}),
        Instruction(Opcode.SETREQ, {"param_addr": 4, "out_stride": 1}),
        Instruction(Opcode.REQUANT, {"acc_addr": 0, "out_addr": 30, "count": count,
                                     "out_lane": 0, "to_acc": 1, "accumulate": accumulate,
                                     "left_shift": 1}),
    ]
    before = golden.accumulators.copy()
    memories_after, busy, injected = run_requant_unit(c, golden, program, rng)
    np.testing.assert_array_equal(memories_after["act"].values(), golden.activations)
    for instruction in program:
        golden.execute(instruction)
    assert [(addr, flag) for addr, flag, _ in injected] == [
        (30 + i, accumulate) for i in range(count)]
    rows = np.array([row for _, _, row in injected])
    if accumulate:
        rows = rows + before[30:30 + count]
    wrap = 1 << c.accumulator_width
    rows = (rows + wrap // 2) % wrap - wrap // 2
    np.testing.assert_array_equal(rows, golden.accumulators[30:30 + count])
    groups = count * (c.cols // c.requant_lanes)
    last_read = groups if overlap else 2 * groups - 1
    assert busy == last_read + REQUANT_TO_ACC_TAIL_CYCLES


# -- Rescale unit ----------------------------------------------------------------------------

@pytest.mark.parametrize("wait", [0, 3])
def test_rescale_unit_loads_tables_and_looks_words_up_as_the_golden_model(wait):
    """TABLE (started ``wait`` cycles late: the requantizer busy) writes both tables from
    the parameter words; RESCALE, along SETWIN's walk, sends each word's looked-up lanes
    down the accumulate path addressed to the golden model's words, with its accumulate
    flag. ``loading`` lasts the table's load (``TABLE_TAIL_CYCLES``) and ``rescaling``
    the words and ``RESCALE_TAIL_CYCLES``, as the cycle model counts."""
    c = NpuConfig(rows=4, cols=4, requant_lanes=2, requant_overlap=True,
                  rescale_tables=True, **{**SMALL, "param_depth": 256})
    rng = np.random.default_rng(7 + wait)
    golden = requant_state(c, rng)
    golden.params[:, :, :2] = rng.integers(-(1 << 31), 1 << 31, golden.params.shape[:2] + (2,))
    program = [Instruction(Opcode.TABLE, {"param_addr": 5}),
               Instruction(Opcode.SETWIN, {"row_length": 3, "row_step": 7, "col_step": 2}),
               Instruction(Opcode.RESCALE, {"table": 1, "accumulate": 1, "act_addr": 9,
                                            "acc_addr": 20, "count": 8})]
    unit = RescaleUnit(c)
    params = Memory(c, Region.PARAMS, golden.params)
    act = Memory(c, Region.ACTIVATIONS, golden.activations)
    injected, held = [], {}
    strobes = {Opcode.TABLE: unit.table, Opcode.SETWIN: unit.set_win,
               Opcode.RESCALE: unit.rescale}

    async def cycle(ctx):
        await tick_with_memories(ctx, unit, [(unit.param_read, params), (unit.act_read, act)],
                                 injected, rng)

    async def testbench(ctx):
        ctx.set(unit.running, 1)
        ctx.set(unit.run_start, 1)
        await cycle(ctx)
        ctx.set(unit.run_start, 0)
        for instruction in program:
            ctx.set(unit.instruction, encode(instruction))
            ctx.set(strobes[instruction.opcode], 1)
            ctx.set(unit.requant_busy, wait > 0 and instruction.opcode is Opcode.TABLE)
            await cycle(ctx)
            ctx.set(strobes[instruction.opcode], 0)
            ctx.set(unit.instruction, encode(Instruction(Opcode.HALT)) | 0xFFFF_FFFF << 32)
            flag = unit.loading if instruction.opcode is Opcode.TABLE else unit.rescaling
            cycles = 1
            for _ in range(wait - 1 if instruction.opcode is Opcode.TABLE and wait else 0):
                await cycle(ctx)
                cycles += 1
            ctx.set(unit.requant_busy, 0)
            while ctx.get(flag):
                assert not (ctx.get(unit.loading) and ctx.get(unit.rescaling))
                await cycle(ctx)
                cycles += 1
            held[instruction.opcode] = cycles
        for _ in range(8):   # nothing more once it is idle
            await cycle(ctx)

    simulate(unit, testbench)
    before = golden.accumulators.copy()
    for instruction in program:
        for step in golden.state.expand(instruction):   # SETWIN sets the walk
            golden.execute(step)
    # Dispatched beside the requantizer's last `wait` cycles: as if dispatched after them.
    assert held[Opcode.TABLE] == wait + c.table_load_cycles + TABLE_TAIL_CYCLES
    assert held[Opcode.SETWIN] == 1
    assert held[Opcode.RESCALE] == 8 + RESCALE_TAIL_CYCLES
    assert [(addr, flag) for addr, flag, _ in injected] == [(20 + i, 1) for i in range(8)]
    rows = np.array([row for _, _, row in injected]) + before[20:28]
    rows = (rows + (1 << 31)) % (1 << 32) - (1 << 31)
    np.testing.assert_array_equal(rows, golden.accumulators[20:28])


# -- Host port and performance counters ------------------------------------------------------

class HostPortBench:
    """Drives a HostPort's bus and stands in for its memories (the host's accesses only)."""

    def __init__(self, ctx, port: HostPort, config: NpuConfig):
        self.ctx, self.port, self.config = ctx, port, config
        self.memories = {region: Memory(config, region,
                                        np.zeros((info.depth,) + _lane_shape(config, region),
                                                 dtype=np.int64))
                         for region, info in memories(config).items()}
        self.starts = []
        self.cycle = 0

    async def tick(self):
        ctx, port = self.ctx, self.port
        accesses = []
        for memory in self.memories.values():
            access = getattr(port, memory.info.name)
            addr, data, en = ctx.get(access.addr), ctx.get(access.data), ctx.get(access.en)
            accesses.append((access, memory, addr))
            if en:
                memory.write(addr, data, en)
        await ctx.tick()
        self.cycle += 1
        for access, memory, addr in accesses:
            ctx.set(access.read_data, memory.entries[addr])
        if ctx.get(port.start):
            self.starts.append(self.cycle)

    async def write(self, addr: int, word: int):
        ctx, host = self.ctx, self.port.host
        ctx.set(host.valid, 1)
        ctx.set(host.write, 1)
        ctx.set(host.addr, addr)
        ctx.set(host.wdata, word)
        await self.tick()
        ctx.set(host.valid, 0)
        ctx.set(host.write, 0)

    async def read(self, addr: int) -> int:
        ctx, host = self.ctx, self.port.host
        ctx.set(host.valid, 1)
        ctx.set(host.write, 0)
        ctx.set(host.addr, addr)
        await self.tick()
        ctx.set(host.valid, 0)
        for cycle in range(1, host_read_latency(self.config)):
            assert not ctx.get(host.rvalid), f"rvalid {cycle} cycles after the request"
            await self.tick()
        assert ctx.get(host.rvalid)
        return ctx.get(host.rdata)


def _lane_shape(config: NpuConfig, region: Region) -> tuple[int, ...]:
    golden = GoldenNpu(config)
    return golden.memory(region).shape[1:]


HOST_CONFIGS = {
    "2x2": NpuConfig(rows=2, cols=2, requant_lanes=1, **SMALL),
    "2x8-wide": NpuConfig(rows=2, cols=8, requant_lanes=2, **SMALL),  # 8-word entries
}


@pytest.mark.parametrize("name", list(HOST_CONFIGS))
def test_host_port_memories_registers_and_control(name):
    """Each memory takes the host's words where the host's address map puts them and
    gives them back after ``host_read_latency`` cycles; the identity block, STATUS,
    START_PC, PC, the counters and UPTIME read back; a CONTROL write pulses ``start`` the
    cycle after; during a run memory accesses are refused and flag HOST_CONFLICT, until
    the next start."""
    c = HOST_CONFIGS[name]
    port = HostPort(c)
    rng = np.random.default_rng(5)
    counter_values = {n: int(rng.integers(0, 1 << COUNTER_BITS)) for n in COUNTER_NAMES}

    async def testbench(ctx):
        bench = HostPortBench(ctx, port, c)
        for n, value in counter_values.items():
            ctx.set(getattr(port.counters, n), value)
        ctx.set(port.uptime, (1 << COUNTER_BITS) - 3)
        ctx.set(port.pc, 5)
        written = {}
        for region, info in memories(c).items():
            for entry in (0, info.depth - 1, int(rng.integers(0, info.depth))):
                for word in range(info.stride):
                    value = int(rng.integers(0, 1 << 32))
                    await bench.write(address(region, entry * info.stride + word), value)
                    written[address(region, entry * info.stride + word)] = value

        def stored(addr: int) -> int:
            """The word written at ``addr``, as much of it as the entry holds."""
            info = memories(c)[Region(addr >> 24)]
            bits = min(32, info.width - 32 * (addr % info.stride))   # padding reads 0
            return written[addr] & ((1 << max(bits, 0)) - 1)

        for addr in written:
            assert await bench.read(addr) == stored(addr), hex(addr)
        identity = identity_words(c)
        for index, word in enumerate(identity):
            assert await bench.read(address(Region.REGISTERS, Reg.MAGIC + index)) == word
        for index, n in enumerate(COUNTER_NAMES):
            low = await bench.read(address(Region.REGISTERS, Reg.COUNTERS + 2 * index))
            high = await bench.read(address(Region.REGISTERS, Reg.COUNTERS + 2 * index + 1))
            assert low | high << 32 == counter_values[n], n
        low = await bench.read(address(Region.REGISTERS, Reg.UPTIME))
        high = await bench.read(address(Region.REGISTERS, Reg.UPTIME + 1))
        assert low | high << 32 == (1 << COUNTER_BITS) - 3
        assert await bench.read(address(Region.REGISTERS, Reg.PC)) == 5
        await bench.write(address(Region.REGISTERS, Reg.START_PC), 7)
        assert await bench.read(address(Region.REGISTERS, Reg.START_PC)) == 7
        assert await bench.read(address(Region.REGISTERS, Reg.STATUS)) == 0

        # A run: start the cycle after the write; memories refused; HOST_CONFLICT sticks.
        await bench.write(address(Region.REGISTERS, Reg.CONTROL), Control.START)
        assert bench.starts == [bench.cycle]
        assert await bench.read(address(Region.REGISTERS, Reg.STATUS)) == 0
        ctx.set(port.running, 1)
        assert await bench.read(address(Region.REGISTERS, Reg.STATUS)) == Status.RUNNING
        first = address(Region.ACTIVATIONS, 0)
        await bench.write(first, 0x12345678)
        assert await bench.read(first) == 0
        assert await bench.read(address(Region.REGISTERS, Reg.STATUS)) == (
            Status.RUNNING | Status.HOST_CONFLICT)
        await bench.write(address(Region.REGISTERS, Reg.CONTROL), Control.START)
        assert len(bench.starts) == 1    # no start while running
        ctx.set(port.running, 0)
        ctx.set(port.done, 1)
        ctx.set(port.illegal, 1)
        ctx.set(port.aborted, 1)
        assert await bench.read(address(Region.REGISTERS, Reg.STATUS)) == (
            Status.DONE | Status.HOST_CONFLICT | Status.ILLEGAL_INSTRUCTION | Status.ABORTED)
        assert await bench.read(first) == stored(first)
        await bench.write(address(Region.REGISTERS, Reg.CONTROL), Control.START)
        assert await bench.read(address(Region.REGISTERS, Reg.STATUS)) == (
            Status.DONE | Status.ILLEGAL_INSTRUCTION | Status.ABORTED)
        # Addresses past a memory or a region name nothing: reads answer 0.
        info = memories(c)[Region.PARAMS]
        assert await bench.read(address(Region.PARAMS, info.depth * info.stride)) == 0
        assert await bench.read(address(Region.PARAMS + 1, 0)) == 0

    simulate(port, testbench)


@pytest.mark.parametrize("rows,cols,activity", [(2, 2, True), (2, 3, True), (2, 2, False)])
def test_performance_counters_count_as_the_cycle_model(rows, cols, activity):
    """Random run, stall and issue patterns: cycles, stall_cycles and busy_cycles count
    them, macs is rows × cols per busy cycle (derived by a shift for a power of two,
    counted otherwise), clear zeroes them all, UPTIME never stops. Without
    ``activity_counters`` only cycles counts; the others read zero, and the host takes
    them for absent."""
    c = NpuConfig(rows=rows, cols=cols, requant_lanes=1, activity_counters=activity,
                  **SMALL)
    counters = PerformanceCounters(c)
    rng = np.random.default_rng(rows * 10 + cols)

    async def testbench(ctx):
        want = Counters()
        for cycle in range(1, 300):
            running, stall, issue = (int(bit) for bit in rng.integers(0, 2, 3))
            clear = int(rng.random() < 0.02)
            ctx.set(counters.running, running)
            ctx.set(counters.stall, stall)
            ctx.set(counters.issue, issue & running)
            ctx.set(counters.clear, clear)
            await ctx.tick()
            if clear:
                want = Counters()
            else:
                want.cycles += running
                want.stall_cycles += running & stall
                want.busy_cycles += issue & running
                want.macs += (issue & running) * rows * cols
            got = [ctx.get(getattr(counters.counters, n)) for n in COUNTER_NAMES]
            if activity:
                assert dict(zip(COUNTER_NAMES, got, strict=True)) == want.as_dict()
            else:
                assert got == [want.cycles, 0, 0, 0]
            words = [part for value in got for part in (value & 0xFFFFFFFF, value >> 32)]
            assert counters_from_words(words, c) == want.as_counted_by(c)
            assert ctx.get(counters.uptime) == cycle

    simulate(counters, testbench)


# -- Accumulate path ---------------------------------------------------------------------

ACCUMULATE_CONFIGS = {
    "2x2-no-feature-maps": NpuConfig(rows=2, cols=2, requant_lanes=1, feature_maps=False,
                                     **SMALL),
    "4x4": NpuConfig(rows=4, cols=4, requant_lanes=2, **SMALL),
    "4x2-acc16": NpuConfig(rows=4, cols=2, input_width=4, weight_width=4,
                           accumulator_width=16, requant_lanes=2, **SMALL),
    # Rows broadcast to their columns: the rows arrive cols - 1 cycles sooner.
    "4x4-broadcast": NpuConfig(rows=4, cols=4, requant_lanes=1, row_broadcast=True,
                               load_skew=False, **SMALL),
    # The depthwise tap row: the rows arrive a cycle later.
    "5x5-tap-row": NpuConfig(rows=5, cols=5, requant_lanes=5, line_buffer_depth=8,
                             depthwise_tap_row=True, **SMALL),
}


def signed_wrap(values, width: int):
    half = 1 << (width - 1)
    return (np.asarray(values) + half) % (1 << width) - half


def run_accumulate_path(config: NpuConfig, initial: np.ndarray, issues: dict,
                        injections: dict, cycles: int, rng: np.random.Generator):
    """Drive an AccumulatePath: ``issues`` maps a cycle to (addr, accumulate, max, row),
    the row given on ``result`` ``array_latency`` cycles after the activation word
    enters the array (the cycle after its issue: its memory read); ``injections`` maps a
    cycle to (addr, accumulate, row), read then, injected the cycle after. Returns the
    accumulators after ``cycles`` cycles and the cycle of each write, by address."""
    unit = AccumulatePath(config)
    acc = Memory(config, Region.ACCUMULATORS, initial)
    latency = array_latency(config.array_rows, config.skew_cols)
    arriving = {cycle + 1 + latency: row for cycle, (*_, row) in issues.items()}
    writes = []

    def row_word(row) -> int:
        return sum((int(v) % (1 << config.accumulator_width)) << (k * config.accumulator_width)
                   for k, v in enumerate(row))

    async def testbench(ctx):
        ctx.set(unit.running, 1)
        for cycle in range(cycles):
            addr, accumulate, combine, _ = issues.get(cycle, (0, 0, 0, None))
            ctx.set(unit.issue.valid, cycle in issues)
            ctx.set(unit.issue.addr, addr)
            ctx.set(unit.issue.accumulate, accumulate)
            ctx.set(unit.issue.max, combine)
            garbage = rng.integers(-100, 100, config.cols)
            row = arriving.get(cycle, garbage)
            for k in range(config.cols):
                ctx.set(unit.result[k], int(row[k]))
            read = injections.get(cycle)
            ctx.set(unit.inject_read.valid, read is not None)
            if read is not None:
                ctx.set(unit.inject_read.addr, read[0])
                ctx.set(unit.inject_read.accumulate, read[1])
            data = injections.get(cycle - 1)
            ctx.set(unit.inject.valid, data is not None)
            if data is not None:
                ctx.set(unit.inject.addr, data[0])
                ctx.set(unit.inject.accumulate, data[1])
                for k in range(config.cols):
                    ctx.set(unit.inject_row[k], int(data[2][k]))
            read_valid, read_addr = ctx.get(unit.acc_read.valid), ctx.get(unit.acc_read.addr)
            if ctx.get(unit.acc_write.valid):
                addr = ctx.get(unit.acc_write.addr)
                acc.write(addr, ctx.get(unit.acc_write.data), ctx.get(unit.acc_write.en))
                writes.append((cycle, addr))
            await ctx.tick()
            # The read port is transparent for the write port: this cycle's write shows.
            ctx.set(unit.acc_read.data, acc.entries[read_addr] if read_valid
                    else row_word(rng.integers(-100, 100, config.cols)))

    simulate(unit, testbench)
    return acc.values(), writes


@pytest.mark.parametrize("name", list(ACCUMULATE_CONFIGS))
@pytest.mark.parametrize("seed", [1, 2])
def test_accumulate_path_matches_golden_and_cycle_model(name, seed):
    """Random rows, back to back or spaced, to a few words (so that successive rows hit
    the same word and must be forwarded): the accumulators end as the golden MATMUL's
    (add, max with ``combine`` in feature-map builds, or overwrite, wrapping at the
    accumulator width), and each row is written ``results_written_cycles - 1`` cycles
    after its issue (visible to a REQUANT dispatched ``results_written_cycles`` after)."""
    c = ACCUMULATE_CONFIGS[name]
    rng = np.random.default_rng(seed)
    reach = psum_width(c, c.rows)
    initial = rng.integers(-(1 << (c.accumulator_width - 1)), 1 << (c.accumulator_width - 1),
                           (c.accumulator_depth, c.cols))
    issues, cycle = {}, 0
    for _ in range(60):
        cycle += int(rng.choice([1, 1, 1, 2, 3]))
        issues[cycle] = (int(rng.integers(0, 4)), int(rng.integers(0, 2)),
                         int(rng.integers(0, 2)) if c.feature_maps else 0,
                         rng.integers(-(1 << (reach - 1)), 1 << (reach - 1), c.cols))
    want = initial.copy()
    for addr, accumulate, combine, row in issues.values():
        if accumulate:
            row = np.maximum(want[addr], row) if combine else want[addr] + row
        want[addr] = signed_wrap(row, c.accumulator_width)
    got, writes = run_accumulate_path(c, initial, issues, {}, cycle + 20, rng)
    np.testing.assert_array_equal(got, want)
    assert writes == [(cycle + results_written_cycles(c.array_rows, c.skew_cols) - 1, addr)
                      for cycle, (addr, *_) in issues.items()]


def test_accumulate_path_takes_requant_rows():
    """REQUANT to_acc rows (feature-map builds): read, then injected in place of the
    array's, added to their word or written over it, back to back."""
    c = ACCUMULATE_CONFIGS["4x4"]
    rng = np.random.default_rng(9)
    initial = rng.integers(-(1 << 30), 1 << 30, (c.accumulator_depth, c.cols))
    injections = {3: (5, 1, rng.integers(-(1 << 30), 1 << 30, c.cols)),
                  5: (5, 1, rng.integers(-(1 << 30), 1 << 30, c.cols)),
                  7: (6, 0, rng.integers(-(1 << 30), 1 << 30, c.cols))}
    want = initial.copy()
    for addr, accumulate, row in injections.values():
        want[addr] = signed_wrap(row + want[addr] if accumulate else row, c.accumulator_width)
    got, writes = run_accumulate_path(c, initial, {}, injections, 20, rng)
    np.testing.assert_array_equal(got, want)
    assert writes == [(cycle + 2, addr) for cycle, (addr, *_) in injections.items()]


# -- Weight loader and feeder ------------------------------------------------------------

def dispatch_load(ctx, loader, cycle: int, dispatches: list[int], tiles) -> None:
    """In the cycles of ``dispatches``, dispatch a LOADW of the next of ``tiles``
    (address, bank)."""
    if cycle in dispatches:
        addr, bank = tiles[dispatches.index(cycle)]
        ctx.set(loader.dispatch, 1)
        ctx.set(loader.bank, bank)
        ctx.set(loader.weight_addr, addr)


def assert_loader_flags(busy, ready, filling, dispatches, rows, next_at, loaded_at):
    """The loader's ``busy``, ``ready`` and ``filling`` a cycle at a time for two LOADWs
    dispatched at ``dispatches`` (0 and ``next_at``), as the cycle model has them: busy
    until the last dispatch + rows + ``WEIGHT_LOAD_STAGES`` (``load_free_at``)."""
    load_free_at = next_at + rows + WEIGHT_LOAD_STAGES
    assert busy == [0] + [1] * (load_free_at - 1) + [0] * (len(busy) - load_free_at)
    assert [cycle for cycle, on in enumerate(ready) if not on] == \
        [cycle for cycle in range(len(ready)) if 0 < cycle < next_at
         or next_at < cycle < 2 * next_at]
    assert [cycle for cycle, on in enumerate(filling) if on] == \
        [cycle for d in dispatches for cycle in range(d + 1, d + loaded_at)]


@pytest.mark.parametrize("rows,cols", [(1, 3), (2, 2), (3, 5), (4, 2)])
def test_weight_loader_loads_tiles_back_to_back_in_the_cycle_models_time(rows, cols):
    """LOADW: the array's ``bank`` takes the tile's rows, last row first, one a cycle from
    the memory. A second LOADW, dispatched in the first cycle ``ready`` allows (the cycle
    model's ``load_next_cycles``), shifts its rows right behind the first's; ``filling``
    falls ``weight_load_cycles`` after each dispatch, ``busy`` holds until the cycle
    model's ``load_free_at`` (the last dispatch + rows + ``WEIGHT_LOAD_STAGES``)."""
    c = NpuConfig(rows=rows, cols=cols, requant_lanes=1, **SMALL)
    loader = WeightLoader(c)
    rng = np.random.default_rng(rows * cols)
    golden = GoldenNpu(c)
    golden.weights[:] = rng.integers(-128, 128, golden.weights.shape)
    weights = Memory(c, Region.WEIGHTS, golden.weights)
    tiles = [(int(rng.integers(0, c.weight_depth - rows)), bank) for bank in (1, 0)]
    next_at, loaded_at = load_next_cycles(rows, cols), weight_load_cycles(rows, cols)
    dispatches = [0, next_at]
    loads, busy, ready, filling = [], [], [], []

    async def testbench(ctx):
        for cycle in range(2 * rows + 6):
            dispatch_load(ctx, loader, cycle, dispatches, tiles)
            valid, read = ctx.get(loader.weight_read.valid), ctx.get(loader.weight_read.addr)
            if ctx.get(loader.load):
                loads.append((cycle, ctx.get(loader.load_bank), ctx.get(loader.weight_row)))
            busy.append(ctx.get(loader.busy))
            ready.append(ctx.get(loader.ready))
            filling.append(ctx.get(loader.filling))
            if 0 < cycle <= next_at:
                assert ctx.get(loader.loading_bank) == tiles[0][1]
            await ctx.tick()
            ctx.set(loader.dispatch, 0)
            ctx.set(loader.bank, 1 - ctx.get(loader.bank))    # the sequencer moves on
            ctx.set(loader.weight_addr, 0)
            ctx.set(loader.weight_read.data, weights.entries[read] if valid
                    else int(rng.integers(0, 1 << 30)))

    simulate(loader, testbench)
    assert_loader_flags(busy, ready, filling, dispatches, rows, next_at, loaded_at)
    assert [(cycle, b) for cycle, b, _ in loads] == \
        [(WEIGHT_LOAD_STAGES + i, bank) for i, (_, bank) in
         enumerate(tile for tile in tiles for _ in range(rows))]
    assert [word for *_, word in loads] == [weights.entries[addr + rows - 1 - i]
                                            for addr, _ in tiles for i in range(rows)]


@pytest.mark.parametrize("rows,segments", [(4, 2), (8, 4), (4, 4)])
def test_weight_loader_segments_load_a_tile_in_rows_over_segments_cycles(rows, segments):
    """With ``weight_segments`` S, segment s takes rows s·L to s·L + L − 1 of the tile
    (L = rows / S) from part s of the memory, last row first, s·L cycles after segment
    0, so a second LOADW dispatches L cycles after the first (``load_next_cycles`` of L)
    and ``busy`` holds until the last segment's last shift (the cycle model's
    ``load_free_at``: the last dispatch + rows + ``WEIGHT_LOAD_STAGES``)."""
    c = NpuConfig(rows=rows, cols=3, requant_lanes=1, weight_segments=segments, **SMALL)
    length = c.load_rows
    loader = WeightLoader(c)
    rng = np.random.default_rng(rows + segments)
    words = rng.integers(0, 1 << 24, (segments, c.weight_depth // segments))
    reads = [loader.weight_read, *loader.segment_read]
    rows_in = [(loader.load, loader.load_bank, loader.weight_row),
               *((loader.segment_load[s], loader.segment_load_bank[s], loader.segment_row[s])
                 for s in range(segments - 1))]
    tiles = [(rows * int(rng.integers(0, c.weight_depth // rows)), bank) for bank in (1, 0)]
    next_at, loaded_at = load_next_cycles(length, 3), weight_load_cycles(length, 3)
    dispatches = [0, next_at]
    loads = [[] for _ in range(segments)]
    busy, ready, filling = [], [], []

    async def testbench(ctx):
        for cycle in range(2 * rows + 8):
            dispatch_load(ctx, loader, cycle, dispatches, tiles)
            asked = [(ctx.get(read.valid), ctx.get(read.addr)) for read in reads]
            for s, (load, bank, row) in enumerate(rows_in):
                if ctx.get(load):
                    loads[s].append((cycle, ctx.get(bank), ctx.get(row)))
            busy.append(ctx.get(loader.busy))
            ready.append(ctx.get(loader.ready))
            filling.append(ctx.get(loader.filling))
            await ctx.tick()
            ctx.set(loader.dispatch, 0)
            ctx.set(loader.bank, 1 - ctx.get(loader.bank))    # the sequencer moves on
            ctx.set(loader.weight_addr, 0)
            for s, (read, (valid, addr)) in enumerate(zip(reads, asked, strict=True)):
                ctx.set(read.data, int(words[s][addr]) if valid else int(rng.integers(0, 1 << 24)))

    simulate(loader, testbench)
    assert_loader_flags(busy, ready, filling, dispatches, rows, next_at, loaded_at)
    for s in range(segments):
        # Part s holds the tile at address addr / S: its rows s·L to s·L + L − 1.
        assert loads[s] == [
            (d + WEIGHT_LOAD_STAGES + s * length + i, bank,
             int(words[s][addr // segments + length - 1 - i]))
            for d, (addr, bank) in zip(dispatches, tiles, strict=True) for i in range(length)]


FEEDER_WINDOWS = [
    None,
    {"row_length": 3, "row_step": 10, "col_step": 2, "reduce": 0},
    {"row_length": 2, "row_step": 5, "col_step": 1, "reduce": 1},
]


@pytest.mark.parametrize("window", FEEDER_WINDOWS)
@pytest.mark.parametrize("count", [1, 2, 7])
def test_feeder_streams_and_tracks_flight_as_the_cycle_model(window, count):
    """MATMUL: the words issue in the cycles after the dispatch from the golden model's
    activation words (SETWIN walk), each tagged with its accumulator word (one word with
    ``reduce``, accumulating after the first); ``ready``, ``busy``, ``inflight_idle`` of
    the bank and ``drain_idle`` change in the cycles the cycle model says the next MATMUL,
    LOADW of the bank, and REQUANT may dispatch."""
    c = NpuConfig(rows=4, cols=4, requant_lanes=2, feature_maps=window is not None, **SMALL)
    feeder = Feeder(c)
    state = GemmState(c.rows)
    program = []
    if window is not None:
        program.append(Instruction(Opcode.SETWIN, window))
    matmul = Instruction(Opcode.MATMUL, {"bank": 1, "act_addr": 3, "acc_addr": 9,
                                         "count": count, "accumulate": 0, "combine": 1})
    for instruction in program:
        state.expand(instruction)
    model = CycleModel(c)
    dispatch_cycle = 3
    model.next_cycle = dispatch_cycle
    model.dispatch(matmul)
    seen = []

    async def testbench(ctx):
        ctx.set(feeder.running, 1)
        ctx.set(feeder.run_start, 1)
        await ctx.tick()
        ctx.set(feeder.run_start, 0)
        for instruction in program:
            ctx.set(feeder.instruction, encode(instruction))
            ctx.set(feeder.set_win, 1)
            await ctx.tick()
            ctx.set(feeder.set_win, 0)
        for cycle in range(dispatch_cycle, dispatch_cycle + count + 30):
            if cycle == dispatch_cycle:
                for name in ("bank", "act_addr", "acc_addr", "count", "accumulate", "combine"):
                    ctx.set(getattr(feeder, name), matmul[name])
            ctx.set(feeder.dispatch, cycle == dispatch_cycle)
            seen.append((cycle, ctx.get(feeder.issue.valid), ctx.get(feeder.act_read.valid),
                         ctx.get(feeder.act_read.addr), ctx.get(feeder.issue.addr),
                         ctx.get(feeder.issue.accumulate), ctx.get(feeder.issue.max),
                         ctx.get(feeder.ready), ctx.get(feeder.busy),
                         ctx.get(feeder.inflight_idle[1]), ctx.get(feeder.drain_idle),
                         ctx.get(feeder.drain_wait)))
            await ctx.tick()

    simulate(feeder, testbench)
    issued = [row for row in seen if row[1]]
    words = 3 + state.window.offsets(count)
    assert [row[0] for row in issued] == [dispatch_cycle + 1 + i for i in range(count)]
    assert all(row[2] for row in issued)
    assert [row[3] for row in issued] == [int(w) % c.activation_depth for w in words]
    if state.reduce:
        assert [row[4:7] for row in issued] == [(9, int(i > 0), 1) for i in range(count)]
    else:
        combine = int(c.feature_maps)
        assert [row[4:7] for row in issued] == [(9 + i, 0, combine) for i in range(count)]
    last = model.feeder_last_issue
    for cycle, _, _, _, _, _, _, ready, busy, inflight_idle, drain_idle, drain_wait in seen:
        after = cycle > dispatch_cycle
        assert ready == (not after or cycle >= last), cycle        # the next MATMUL
        assert busy == (after and cycle <= last), cycle            # LOADW, REQUANT, HALT
        # From the cycle after the first issue (``busy`` covers the issue cycles).
        flying = cycle > dispatch_cycle + 1
        assert inflight_idle == (not flying or cycle >= model.inflight_clear_at[1]), cycle
        assert drain_idle == (not flying or cycle >= model.drain_clear_at), cycle
        # What a REQUANT dispatched now waits before it starts (requant_overlap).
        if after:
            assert drain_wait == max(0, model.drain_clear_at - cycle), cycle


# -- Sequencer and GEMM expansion --------------------------------------------------------

SEQUENCER_CONFIGS = {
    "4x4": NpuConfig(rows=4, cols=4, requant_lanes=2, **SMALL),
    "2x2-no-feature-maps": NpuConfig(rows=2, cols=2, requant_lanes=1, feature_maps=False,
                                     **SMALL),
}


def run_sequencer(config: NpuConfig, program: list[Instruction] | list[int], *,
                  start_pc: int = 0, busy_until: int = 0, cycles: int = 60):
    """Run ``program`` (from ``start_pc``) on a Sequencer whose units are all free, but
    for the feeder, busy until cycle ``busy_until``. Returns each dispatch as (cycle,
    strobe or opcode name, fields), the stall cycles, and the final flags and PC."""
    seq = Sequencer(config)
    words = [w if isinstance(w, int) else encode(w) for w in program]
    words += [0] * (config.instruction_depth - len(words))
    dispatches, result = [], {"stalls": 0}
    strobes = ("loadw", "matmul", "requant", "set_pp", "set_req", "set_out", "set_win")

    async def testbench(ctx):
        ctx.set(seq.inflight_idle, 0b11)
        ctx.set(seq.drain_idle, 1)
        ctx.set(seq.feed_ready, 1)
        ctx.set(seq.load_ready, 1)
        ctx.set(seq.start_pc, start_pc)
        ctx.set(seq.start, 1)
        await ctx.tick()
        ctx.set(seq.start, 0)
        for cycle in range(cycles):
            ctx.set(seq.feed_busy, cycle < busy_until)
            addr, en = ctx.get(seq.fetch_addr), ctx.get(seq.fetch_en)
            fired = [name for name in strobes if ctx.get(getattr(seq, name))]
            if fired:
                fields = {name: ctx.get(getattr(seq, name)) for name in STEP_FIELDS}
                dispatches.append((cycle, fired, fields))
            result["stalls"] += ctx.get(seq.stall) & ctx.get(seq.running)  # counted so
            running_before = ctx.get(seq.running)
            pc_before = ctx.get(seq.pc)
            await ctx.tick()
            if running_before and not ctx.get(seq.running) and "end" not in result:
                result["end"] = cycle
                result["end_pc"] = pc_before
            if en and ctx.get(seq.running):
                ctx.set(seq.fetch_data, words[addr])
        result.update(done=ctx.get(seq.done), illegal=ctx.get(seq.illegal),
                      pc=ctx.get(seq.pc))

    simulate(seq, testbench)
    return dispatches, result


@pytest.mark.parametrize("name", list(SEQUENCER_CONFIGS))
def test_sequencer_dispatches_the_golden_steps_one_a_cycle(name):
    """With every unit free, the steps (a GEMM expanded into its LOADW/MATMUL pairs, by
    the golden model's GemmState) dispatch one a cycle from the run's cycle 2, in order,
    with the golden model's fields; the run ends at HALT (``done``), with the cycle
    model's count of cycles."""
    c = SEQUENCER_CONFIGS[name]
    program = [Instruction(Opcode.SETPP, {"zero_point": 1, "clamp_min": -5, "clamp_max": 5}),
               Instruction(Opcode.SETGEMM, {"weight_addr": 8, "k_tiles": 3, "tile_step": 5})]
    if c.feature_maps:
        program += [Instruction(Opcode.SETKERN, {"kernel_w": 2, "kernel_h": 1,
                                                 "kernel_row_step": 7}),
                    Instruction(Opcode.SETWIN, {"row_length": 2, "row_step": 3,
                                                "col_step": 1})]
    program += [
        Instruction(Opcode.GEMM, {"bank": 1, "act_addr": 2, "acc_addr": 4, "count": 3,
                                  "accumulate": 0, "combine": 0}),
        Instruction(Opcode.LOADW, {"bank": 0, "weight_addr": 30}),
        Instruction(Opcode.MATMUL, {"bank": 0, "act_addr": 11, "acc_addr": 12, "count": 2,
                                    "accumulate": 1}),
        Instruction(Opcode.SETREQ, {"param_addr": 3, "out_stride": 1}),
        Instruction(Opcode.REQUANT, {"acc_addr": 4, "out_addr": 0, "count": 3}),
        Instruction(Opcode.HALT),
    ]
    dispatches, result = run_sequencer(c, program, start_pc=0)
    expanded = expand_program(c, program)
    unseen = (Opcode.SETGEMM, Opcode.SETKERN, Opcode.HALT)   # no strobe: the sequencer's
    steps = [step for step in expanded if step.opcode not in unseen]
    assert [cycle for cycle, *_ in dispatches] == [
        2 + i for i, step in enumerate(expanded) if step.opcode not in unseen]
    assert [fired for _, fired, _ in dispatches] == [
        [{Opcode.LOADW: "loadw", Opcode.MATMUL: "matmul", Opcode.REQUANT: "requant",
          Opcode.SETPP: "set_pp", Opcode.SETREQ: "set_req", Opcode.SETWIN: "set_win"}[
              step.opcode]] for step in steps]
    for (_, _, fields), step in zip(dispatches, steps, strict=True):
        if step.opcode is Opcode.LOADW:
            assert (fields["bank"], fields["weight_addr"]) == (step["bank"],
                                                               step["weight_addr"])
        elif step.opcode is Opcode.MATMUL:
            assert fields == {name: step[name] if name != "weight_addr" else fields[name]
                              for name in STEP_FIELDS}, step
    assert result["done"] and not result["illegal"]
    # HALT, the last step, dispatches in the cycle after the one before it.
    assert result["end"] == 2 + len(expand_program(c, program)) - 1
    assert result["stalls"] == 0


def test_sequencer_pairs_a_gemms_next_loadw_with_its_matmul():
    """With ``paired_loads`` (a weight segment per row) and the units free, each K tile's
    MATMUL but the last dispatches with the next K tile's LOADW (the other bank, the
    next tile's address: ``load_bank``, ``load_weight_addr``), so a GEMM of three K tiles
    takes four cycles, the cycle model's."""
    c = SEQUENCER_CONFIGS["4x4"].replace(weight_segments=4)
    assert c.paired_loads
    program = [Instruction(Opcode.SETGEMM, {"weight_addr": 8, "k_tiles": 3, "tile_step": 5}),
               Instruction(Opcode.GEMM, {"bank": 1, "act_addr": 2, "acc_addr": 4,
                                         "count": 1}),
               Instruction(Opcode.HALT)]
    seq = Sequencer(c)
    words = [encode(w) for w in program] + [0] * (c.instruction_depth - len(program))
    seen = []

    async def testbench(ctx):
        ctx.set(seq.inflight_idle, 0b11)
        ctx.set(seq.drain_idle, 1)
        ctx.set(seq.feed_ready, 1)
        ctx.set(seq.load_ready, 1)
        ctx.set(seq.start, 1)
        await ctx.tick()
        ctx.set(seq.start, 0)
        for cycle in range(12):
            addr, en = ctx.get(seq.fetch_addr), ctx.get(seq.fetch_en)
            if ctx.get(seq.loadw) or ctx.get(seq.matmul):
                seen.append((cycle, ctx.get(seq.loadw), ctx.get(seq.matmul),
                             ctx.get(seq.load_bank), ctx.get(seq.load_weight_addr),
                             ctx.get(seq.bank), ctx.get(seq.act_addr)))
            await ctx.tick()
            if en and ctx.get(seq.running):
                ctx.set(seq.fetch_data, words[addr])

    simulate(seq, testbench)
    # (cycle, loadw, matmul, the loader's bank and address, the MATMUL's bank and word)
    # SETGEMM dispatches in cycle 2, the first LOADW in 3.
    assert [(cycle, loadw, matmul, *load) for cycle, loadw, matmul, *load, _, _ in seen] == [
        (3, 1, 0, 1, 8), (4, 1, 1, 0, 12), (5, 1, 1, 1, 16), (6, 0, 1, 1, 16)]
    assert [(bank, act) for _, _, matmul, _, _, bank, act in seen if matmul] == [
        (1, 2), (0, 7), (1, 12)]
    model, cycles = CycleModel(c), []
    for step in expand_program(c, program)[:-1]:   # but HALT
        model.dispatch(step)
        cycles.append(model.next_cycle - 1)
    # SETGEMM, then LOADW, MATMUL, LOADW, MATMUL, LOADW, MATMUL
    assert cycles == [2, 3, 4, 4, 5, 5, 6]


def test_sequencer_waits_and_counts_stalls():
    """A REQUANT waits for the feeder: ``stall`` counts the cycles it waits (the cycle
    model's ``stall_cycles``)."""
    c = SEQUENCER_CONFIGS["4x4"]
    program = [Instruction(Opcode.SETPP, {}), Instruction(Opcode.REQUANT, {"count": 1}),
               Instruction(Opcode.HALT)]
    dispatches, result = run_sequencer(c, program, busy_until=9)
    assert [(cycle, fired) for cycle, fired, _ in dispatches] == [(2, ["set_pp"]),
                                                                   (9, ["requant"])]
    assert result["stalls"] == 9 - 3
    assert result["done"]


@pytest.mark.parametrize("to_acc", [0, 1])
def test_sequencer_dispatches_a_requant_beside_the_feeder_with_requant_overlap(to_acc):
    """With ``requant_overlap`` a REQUANT dispatches while the feeder streams (the
    requantization unit waits for the stream's results), as the cycle model counts it;
    one that goes ``to_acc`` still waits for the feeder."""
    c = SEQUENCER_CONFIGS["4x4"].replace(requant_overlap=True)
    requant = Instruction(Opcode.REQUANT, {"count": 1, "to_acc": to_acc})
    program = [Instruction(Opcode.SETPP, {}), requant, Instruction(Opcode.HALT)]
    dispatches, result = run_sequencer(c, program, busy_until=9)
    cycle = 9 if to_acc else 3
    assert [(when, fired) for when, fired, _ in dispatches] == [(2, ["set_pp"]),
                                                                 (cycle, ["requant"])]
    # From cycle 3 until the feeder is idle (9) something waits: the REQUANT, or HALT.
    assert result["stalls"] == 9 - 3 - (0 if to_acc else 1)
    assert requant_waits_for_feed(c.requant_overlap, bool(to_acc)) == bool(to_acc)


@pytest.mark.parametrize("opcode", [15, int(Opcode.SETKERN)])
def test_sequencer_stops_at_an_illegal_instruction(opcode):
    """An opcode the NPU does not have (or SETKERN in a build without feature maps)
    stops the run with ``illegal``, the PC past the instruction."""
    c = SEQUENCER_CONFIGS["2x2-no-feature-maps"]
    setpp, halt = Instruction(Opcode.SETPP, {}), Instruction(Opcode.HALT)
    _, result = run_sequencer(c, [setpp, setpp, opcode, halt])
    assert result["illegal"] and not result["done"]
    assert result["pc"] == 3


def test_feature_map_walks_are_sub_units_of_their_own():
    """The feature-map hardware's walks (SETWIN, SETKERN, SETOUT) are sub-units chosen by
    the configuration: an NPU without it has the linear walks, which decode none of them."""
    from amaranth.hdl import Fragment

    from npugen.hw.feed_walk import LinearWalk, WindowWalk, feed_walk
    from npugen.hw.out_walk import LinearOutWalk, RowOutWalk, out_walk
    from npugen.hw.tap_walk import KernelWalk, TileWalk, tap_walk

    for feature_maps, kinds in ((True, (WindowWalk, KernelWalk, RowOutWalk)),
                                (False, (LinearWalk, TileWalk, LinearOutWalk))):
        c = NpuConfig(feature_maps=feature_maps, **SMALL)
        walks = (feed_walk(c), tap_walk(feature_maps), out_walk(c))
        for walk, kind in zip(walks, kinds, strict=True):
            assert type(walk) is kind
            Fragment.get(walk, None)   # and it elaborates
