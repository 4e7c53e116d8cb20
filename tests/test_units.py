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
from npugen.golden import GoldenNpu, check_program
from npugen.hw.requant_unit import RequantUnit
from npugen.isa import Instruction, Opcode, encode_program
from npugen.job import pack_entries, unpack_entries
from npugen.memory_map import Region, memories
from npugen.timing import REQUANT_TAIL_CYCLES, REQUANT_TO_ACC_TAIL_CYCLES

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
    golden.accumulators[:] = rng.integers(-(1 << 24), 1 << 24, golden.accumulators.shape)
    shape = golden.params.shape[:2]
    golden.params[..., 0] = rng.integers(-(1 << 16), 1 << 16, shape)           # bias
    golden.params[..., 1] = rng.integers(1 << 30, (1 << 31) - 1, shape)        # multiplier
    golden.params[..., 2] = rng.integers(0, 20, shape)                         # shift
    golden.activations[:] = rng.integers(-(1 << (c.input_width - 1)),
                                         1 << (c.input_width - 1), golden.activations.shape)
    return golden


def run_requant_unit(config: NpuConfig, golden: GoldenNpu, program: list[Instruction],
                     rng: np.random.Generator):
    """Run ``program`` (SETPP, SETREQ, SETOUT, then one REQUANT, each dispatched a cycle
    after the last) on a RequantUnit over memories holding ``golden``'s state. Returns the
    memories after the run, the cycles from the REQUANT's dispatch to the first in which
    ``active`` is low again, and the rows it injected into the accumulate path."""
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
        reads = [(port, memory, ctx.get(port.valid), ctx.get(port.addr))
                 for port, memory in ((unit.acc_read, acc), (unit.param_read, params))]
        if ctx.get(unit.act_write.valid):
            act.write(ctx.get(unit.act_write.addr), ctx.get(unit.act_write.data),
                      ctx.get(unit.act_write.en))
        if ctx.get(unit.inject.valid):
            injected.append((ctx.get(unit.inject.addr), ctx.get(unit.inject.accumulate),
                             [ctx.get(unit.inject_row[k]) for k in range(config.cols)]))
        await ctx.tick()
        for port, memory, valid, addr in reads:
            width = memory.info.width
            garbage = int.from_bytes(rng.bytes(-(-width // 8)), "little") % (1 << width)
            ctx.set(port.data, memory.entries[addr] if valid else garbage)

    async def testbench(ctx):
        ctx.set(unit.running, 1)
        ctx.set(unit.run_start, 1)
        await cycle(ctx)
        ctx.set(unit.run_start, 0)
        for instruction in program:
            assert not ctx.get(unit.active)
            ctx.set(unit.instruction, encode(instruction))
            ctx.set(strobes[instruction.opcode], 1)
            await cycle(ctx)
            ctx.set(strobes[instruction.opcode], 0)
            # The sequencer moves on to the next instruction: the unit must not need it.
            ctx.set(unit.instruction, encode(Instruction(Opcode.HALT)) | 0xFFFF_FFFF << 32)
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
}


@pytest.mark.parametrize("name", list(REQUANT_CONFIGS))
@pytest.mark.parametrize("seed", [1, 2])
def test_requant_unit_matches_golden_and_cycle_model(name, seed):
    """Random accumulators, parameters, zero point, clamps, output lane, stride and count:
    every activation lane the unit writes (and those it must leave alone) equals the
    golden model's, and ``active`` holds the sequencer for ``groups + REQUANT_TAIL_CYCLES``
    cycles from the dispatch."""
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
    assert busy == groups + REQUANT_TAIL_CYCLES


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


@pytest.mark.parametrize("accumulate", [0, 1])
def test_requant_unit_to_acc_injects_raw_rows(accumulate):
    """REQUANT to_acc: each accumulator word's unclamped results leave as one row for the
    accumulate path, addressed to the golden model's destination word, with its
    ``accumulate`` flag; the activations are left alone; ``active`` covers the
    accumulate path's write too (``2·groups + REQUANT_TO_ACC_TAIL_CYCLES``)."""
    c = REQUANT_CONFIGS["4x4-lanes2"]
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
    # The unit's part of the tail: the accumulate path's add and write follow the
    # injection (two of REQUANT_TO_ACC_TAIL_CYCLES's three extra cycles are theirs).
    assert busy == 2 * groups + REQUANT_TO_ACC_TAIL_CYCLES

