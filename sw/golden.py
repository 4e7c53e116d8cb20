"""The golden model: the NPU at instruction level, in NumPy, bit-exact with the RTL.

State is the memories, the two weight banks of the array and the post-processing
registers. :meth:`GoldenNpu.run` executes a program and returns the performance counters
the hardware would report; its cycle count comes from :class:`CycleModel`, an exact
model of the sequencer's issue rules (tests hold the RTL's counters against it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .arith import requantize, wrap
from .config import NpuConfig
from .isa import Instruction, Opcode, decode_program
from .memory_map import Region

__all__ = ["GoldenNpu", "Counters", "CycleModel", "ProgramError", "check_program",
           "expand_program", "GemmState"]

#: Registers in each requantization lane (hw/requant.py builds exactly this many).
REQUANT_PIPELINE_STAGES = 7
# Registers between a PE's multiplier and its adder (they let the multiply and the
# accumulate each take a whole clock period on the FPGA).
PRODUCT_PIPELINE_STAGES = 1
# Registers on the array's activation input (the memory's output goes no further).
ARRAY_INPUT_STAGES = 1


def array_latency(rows: int, cols: int) -> int:
    """Cycles from an activation word entering the array to its whole result row."""
    return rows + cols - 1 + PRODUCT_PIPELINE_STAGES + ARRAY_INPUT_STAGES


def weight_use_cycles(rows: int, cols: int) -> int:
    """Cycles after a word's issue during which the last PE may still read its weight."""
    return rows + cols - 1 + ARRAY_INPUT_STAGES
#: Cycles from a REQUANT's dispatch to the cycle the next instruction may dispatch,
#: beyond one cycle per channel group: issue, memory read, then the lane's pipeline.
REQUANT_TAIL_CYCLES = 2 + REQUANT_PIPELINE_STAGES


class ProgramError(ValueError):
    """A program that the NPU cannot run as written (bad address, count, lane)."""


@dataclass
class Counters:
    cycles: int = 0
    busy_cycles: int = 0
    macs: int = 0
    stall_cycles: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class CycleModel:
    """The sequencer's timing: one dispatch a cycle, in order, with the hazard waits
    of the hardware. Cycles 0 and 1 fetch the first instruction into the instruction
    register; cycle 2 may dispatch it."""

    config: NpuConfig
    next_cycle: int = 2
    load_free_at: int = 0          # first cycle the weight loader is idle
    load_bank: int = 0
    feeder_last_issue: int = -1    # last cycle the feeder issues a row
    feeder_bank: int = 0
    inflight_clear_at: list[int] = field(default_factory=lambda: [0, 0])
    drain_clear_at: int = 0        # first cycle every result is in the accumulators
    requant_free_at: int = 0
    counters: Counters = field(default_factory=Counters)

    def dispatch(self, instruction: Instruction) -> None:
        rows, cols = self.config.rows, self.config.cols
        earliest = max(self.next_cycle, self.requant_free_at)
        op = instruction.opcode
        feeder_idle_at = self.feeder_last_issue + 1
        if op is Opcode.LOADW:
            bank = instruction["bank"]
            earliest = max(earliest, self.load_free_at, self.inflight_clear_at[bank])
            if self.feeder_bank == bank:
                earliest = max(earliest, feeder_idle_at)
        elif op is Opcode.MATMUL:
            bank = instruction["bank"]
            earliest = max(earliest, self.feeder_last_issue)
            if self.load_bank == bank:
                earliest = max(earliest, self.load_free_at)
        elif op is Opcode.REQUANT:
            earliest = max(earliest, feeder_idle_at, self.drain_clear_at)
        elif op is Opcode.HALT:
            earliest = max(earliest, feeder_idle_at, self.drain_clear_at, self.load_free_at)
        self.counters.stall_cycles += earliest - self.next_cycle
        cycle = earliest
        if op is Opcode.LOADW:
            self.load_bank = instruction["bank"]
            self.load_free_at = cycle + rows + 2
        elif op is Opcode.MATMUL:
            count = instruction["count"]
            last = cycle + count
            self.feeder_last_issue = last
            self.feeder_bank = instruction["bank"]
            self.inflight_clear_at[instruction["bank"]] = last + weight_use_cycles(rows, cols)
            self.drain_clear_at = last + array_latency(rows, cols) + 3
            self.counters.busy_cycles += count
            self.counters.macs += count * rows * cols
        elif op is Opcode.REQUANT:
            groups = instruction["count"] * (cols // self.config.requant_lanes)
            self.requant_free_at = cycle + groups + REQUANT_TAIL_CYCLES
        self.next_cycle = cycle + 1
        if op is Opcode.HALT:
            self.counters.cycles = cycle + 1


class GemmState:
    """The SETGEMM registers and the expansion of GEMM into LOADW/MATMUL steps."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.weight_addr = 0
        self.k_tiles = 0

    def expand(self, ins: Instruction) -> list[Instruction]:
        """The steps an instruction dispatches as (itself, unless it is a GEMM); updates
        the registers as the hardware does."""
        if ins.opcode is Opcode.SETGEMM:
            self.weight_addr, self.k_tiles = ins["weight_addr"], ins["k_tiles"]
        if ins.opcode is not Opcode.GEMM:
            return [ins]
        steps = []
        for kt in range(self.k_tiles):
            bank = ins["bank"] ^ (kt & 1)
            steps.append(Instruction(Opcode.LOADW, {
                "bank": bank, "weight_addr": (self.weight_addr + kt * self.rows) & 0xFFFF}))
            steps.append(Instruction(Opcode.MATMUL, {
                "bank": bank, "accumulate": int(ins["accumulate"] or kt > 0),
                "act_addr": (ins["act_addr"] + kt * ins["count"]) & 0xFFFF,
                "acc_addr": ins["acc_addr"], "count": ins["count"]}))
        self.weight_addr = (self.weight_addr + self.k_tiles * self.rows) & 0xFFFF
        return steps


def expand_program(config: NpuConfig, program: list[Instruction]) -> list[Instruction]:
    """Every dispatch of a program: GEMMs expanded into their LOADW/MATMUL steps."""
    state = GemmState(config.rows)
    return [step for ins in program for step in state.expand(ins)]


def check_program(config: NpuConfig, program: list[Instruction]) -> None:
    """Raise :class:`ProgramError` if an instruction reaches outside the memories or
    uses a count or lane the hardware cannot run; the message names the instruction."""

    def need(ok: bool, index: int, instruction: Instruction, why: str) -> None:
        if not ok:
            raise ProgramError(f"instruction {index} ({instruction}): {why}")

    if not program or program[-1].opcode is not Opcode.HALT:
        raise ProgramError("a program must end with HALT")
    if len(program) > config.instruction_depth:
        raise ProgramError(
            f"program has {len(program)} instructions, instruction memory holds "
            f"{config.instruction_depth} (instruction_depth)")
    lanes = config.requant_lanes
    state = GemmState(config.rows)
    for index, instruction in enumerate(program):
        if instruction.opcode is Opcode.GEMM:
            need(state.k_tiles >= 1, index, instruction, "k_tiles (SETGEMM) must be at least 1")
            need(instruction["count"] >= 1, index, instruction, "count must be at least 1")
            end = state.weight_addr + state.k_tiles * config.rows
            need(end <= config.weight_depth, index, instruction,
                 f"weight tiles end at word {end}, weight_depth is {config.weight_depth}")
        for ins in state.expand(instruction):
            _check_step(config, lanes, index, ins, need)


def _check_step(config: NpuConfig, lanes: int, index: int, ins: Instruction, need) -> None:
    def within(start: str, count: int, depth_name: str, what: str) -> None:
        end, depth = ins[start] + count, getattr(config, depth_name)
        need(end <= depth, index, ins, f"{what} end at word {end}, {depth_name} is {depth}")

    op = ins.opcode
    if op is Opcode.LOADW:
        within("weight_addr", config.rows, "weight_depth", "weight tile rows")
    elif op in (Opcode.MATMUL, Opcode.REQUANT):
        need(ins["count"] >= 1, index, ins, "count must be at least 1")
        within("acc_addr", ins["count"], "accumulator_depth", "accumulator words")
    if op is Opcode.MATMUL:
        within("act_addr", ins["count"], "activation_depth", "activations")
    elif op is Opcode.SETPP:
        need(ins["clamp_min"] <= ins["clamp_max"], index, ins,
             "clamp_min must not exceed clamp_max")
    elif op is Opcode.REQUANT:
        need(ins["out_lane"] < config.rows and ins["out_lane"] % lanes == 0, index, ins,
             f"out_lane must be a multiple of requant_lanes ({lanes}) below rows "
             f"({config.rows})")


class GoldenNpu:
    """The NPU's state and instruction semantics."""

    def __init__(self, config: NpuConfig) -> None:
        self.config = c = config
        self.instructions = np.zeros(c.instruction_depth, dtype=np.uint64)
        self.activations = np.zeros((c.activation_depth, c.rows), dtype=np.int64)
        self.weights = np.zeros((c.weight_depth, c.cols), dtype=np.int64)
        self.accumulators = np.zeros((c.accumulator_depth, c.cols), dtype=np.int64)
        # Parameter lanes: (bias, multiplier, shift) per channel.
        self.params = np.zeros((c.param_depth, c.requant_lanes, 3), dtype=np.int64)
        self.banks = np.zeros((2, c.rows, c.cols), dtype=np.int64)
        self.zero_point = self.clamp_min = self.clamp_max = 0
        self.param_addr = self.out_stride = 0

    def memory(self, region: Region) -> np.ndarray:
        return {
            Region.INSTRUCTIONS: self.instructions,
            Region.ACTIVATIONS: self.activations,
            Region.WEIGHTS: self.weights,
            Region.ACCUMULATORS: self.accumulators,
            Region.PARAMS: self.params,
        }[Region(region)]

    def write(self, region: Region, entry: int, values: np.ndarray) -> None:
        memory = self.memory(region)
        values = np.asarray(values)
        if entry < 0 or entry + len(values) > len(memory):
            raise ProgramError(
                f"write of {len(values)} words at {entry} overflows {Region(region).name.lower()}"
                f" (depth {len(memory)})")
        memory[entry:entry + len(values)] = values

    def read(self, region: Region, entry: int, count: int) -> np.ndarray:
        return self.memory(region)[entry:entry + count].copy()

    def run(self, start_pc: int = 0) -> Counters:
        """Run from ``start_pc`` until HALT; return the performance counters."""
        program = decode_program(self.instructions[start_pc:])
        halt = next((i for i, ins in enumerate(program) if ins.opcode is Opcode.HALT), None)
        if halt is None:
            raise ProgramError(f"no HALT after instruction {start_pc}")
        program = program[:halt + 1]
        check_program(self.config, program)
        timing = CycleModel(self.config)
        for ins in expand_program(self.config, program):
            self.execute(ins)
            timing.dispatch(ins)
        return timing.counters

    def execute(self, ins: Instruction) -> None:
        c = self.config
        op = ins.opcode
        if op is Opcode.LOADW:
            base = ins["weight_addr"]
            self.banks[ins["bank"]] = self.weights[base:base + c.rows]
        elif op is Opcode.MATMUL:
            rows = self.activations[ins["act_addr"]:ins["act_addr"] + ins["count"]]
            products = rows @ self.banks[ins["bank"]]
            target = slice(ins["acc_addr"], ins["acc_addr"] + ins["count"])
            if ins["accumulate"]:
                products = products + self.accumulators[target]
            self.accumulators[target] = wrap(products, c.accumulator_width)
        elif op is Opcode.REQUANT:
            self._requant(ins)
        elif op is Opcode.SETPP:
            self.zero_point = ins["zero_point"]
            self.clamp_min = ins["clamp_min"]
            self.clamp_max = ins["clamp_max"]
        elif op is Opcode.SETREQ:
            self.param_addr = ins["param_addr"]
            self.out_stride = ins["out_stride"]

    def _requant(self, ins: Instruction) -> None:
        c = self.config
        count = ins["count"]
        groups = c.cols // c.requant_lanes
        param_words = (self.param_addr + np.arange(groups)) % c.param_depth
        params = self.params[param_words].reshape(c.cols, 3)
        acc = self.accumulators[ins["acc_addr"]:ins["acc_addr"] + count]
        out = requantize(
            acc, params[:, 0], params[:, 1], params[:, 2] & 31, self.zero_point,
            self.clamp_min, self.clamp_max,
            accumulator_width=c.accumulator_width, output_width=c.input_width)
        lanes = ins["out_lane"] + np.arange(c.cols)
        words = (ins["out_addr"] + (lanes // c.rows) * self.out_stride) % c.activation_depth
        for i in range(count):
            self.activations[(words + i) % c.activation_depth, lanes % c.rows] = out[i]
