"""The golden model: the NPU at instruction level, in NumPy, bit-exact with the RTL.

State is the memories, the weight banks of the array (two, or one: ``weight_banks``) and
the post-processing registers. :meth:`GoldenNpu.run` executes a program and returns the
performance counters the hardware would report; its cycle count comes from
:class:`CycleModel`, an exact model of the sequencer's issue rules (tests hold the RTL's
counters against it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from .arith import requantize, requantize_raw, wrap
from .config import NpuConfig
from .isa import REQUANT_OVERLAPPERS, Instruction, Opcode
from .layouts import PARAM_LANE_FIELDS, TABLE_FIELDS, param_lane_fields
from .memory_map import Region
from .timing import (
    FILL_TAIL_CYCLES,
    REQUANT_TO_ACC_TAIL_CYCLES,
    RESCALE_TAIL_CYCLES,
    TABLE_TAIL_CYCLES,
    WEIGHT_LOAD_STAGES,
    load_next_cycles,
    requant_cycles,
    requant_waits_for_feed,
    results_written_cycles,
    weight_load_cycles,
    weight_use_cycles,
)

__all__ = ["GoldenNpu", "Counters", "CycleModel", "ProgramError", "check_program",
           "overlap_requants", "expand_program", "requant_rounding", "weight_bank",
           "GemmState", "Walk"]


def address_span(depth: int) -> int:
    """The addresses a memory of ``depth`` words decodes: the hardware's address counters
    wrap at this power of two; words from ``depth`` up do not exist."""
    return 1 << (depth - 1).bit_length()


class ProgramError(ValueError):
    """A program that the NPU cannot run as written (bad address, count, lane)."""


@dataclass
class Counters:
    """The performance counters of a run, as the NPU reports them (the COUNTERS registers,
    :data:`npugen.memory_map.COUNTER_NAMES`, in the same order). On an NPU generated
    without ``activity_counters`` only ``cycles`` is counted: the others are None."""

    cycles: int = 0                  # every cycle of the run, from the first fetch to HALT
    busy_cycles: int | None = 0      # cycles in which the array takes an activation word
    macs: int | None = 0             # rows × cols per busy cycle (padding included)
    stall_cycles: int | None = 0     # cycles in which a fetched instruction waits for a unit

    def as_dict(self) -> dict[str, int | None]:
        """The counters by name."""
        return dict(self.__dict__)

    def __add__(self, other: Counters) -> Counters:
        """Two runs' counters summed (an absent counter stays absent)."""
        return Counters(**{name: None if mine is None or other.as_dict()[name] is None
                           else mine + other.as_dict()[name]
                           for name, mine in self.as_dict().items()})

    def as_counted_by(self, config: NpuConfig) -> Counters:
        """These counters as an NPU of ``config`` reports them: without
        ``activity_counters``, only ``cycles``."""
        if config.activity_counters:
            return self
        return Counters(cycles=self.cycles, busy_cycles=None, macs=None, stall_cycles=None)


@dataclass
class CycleModel:
    """The sequencer's timing: one dispatch a cycle, in order, with the hazard waits
    of the hardware. Cycles 0 and 1 fetch the first instruction into the instruction
    register; cycle 2 may dispatch it."""

    config: NpuConfig
    next_cycle: int = 2
    load_free_at: int = 0          # first cycle the weight loader is idle
    load_next_at: int = 0          # first cycle the loader takes the next LOADW
    loaded_at: int = 0             # first cycle a MATMUL on load_bank may dispatch
    load_bank: int = 0
    feeder_last_issue: int = -1    # last cycle the feeder issues a row
    feeder_bank: int = 0
    inflight_clear_at: list[int] = field(default_factory=lambda: [0, 0])
    drain_clear_at: int = 0        # first cycle every result is in the accumulators
    requant_free_at: int = 0
    requant_started_at: int = 0   # the last REQUANT's or FILL's first cycle of work
    requant_overlap: bool = False  # the last REQUANT lets REQUANT_OVERLAPPERS go on
    blocked_until: int = 0         # a RESCALE holds every instruction until then
    table_free_at: int = 0         # a TABLE holds RESCALE and TABLE until then
    counters: Counters = field(default_factory=Counters)
    # A GEMM's last MATMUL step (paired_loads): its K tile, cycle, and the feeder's bank
    # and last issue before it, for the next K tile's LOADW dispatched beside it.
    pair_with: tuple[int, int, int, int] | None = None

    def _feeder_free_at(self, feeder_idle_at: int) -> int:
        """The first cycle a LOADW may load the bank the feeder streams from: once it is
        idle, or with ``paired_loads`` (each segment one row, the loads skewed: a word's
        bank is free the cycle it issues, ``weight_use_cycles`` 0) in its last issue."""
        return feeder_idle_at - 1 if self.config.paired_loads else feeder_idle_at

    def _paired(self, step: Instruction, bank: int) -> bool:
        """Whether GEMM step ``step``, a LOADW, dispatches in the cycle of the MATMUL of
        the K tile before it (``paired_loads``): if its rules hold then, before that
        MATMUL's dispatch (the sequencer decides both at once)."""
        if (self.pair_with is None or step.opcode is not Opcode.LOADW
                or step.k_tile != self.pair_with[0] + 1):
            return False
        _, cycle, feeder_bank, feeder_last_issue = self.pair_with
        return (cycle >= max(self.load_next_at, self.inflight_clear_at[bank])
                and (feeder_bank != bank
                     or cycle >= self._feeder_free_at(feeder_last_issue + 1)))

    def dispatch(self, instruction: Instruction) -> None:
        rows, cols = self.config.rows, self.config.cols
        op = instruction.opcode
        overlaps = self.requant_overlap and op in REQUANT_OVERLAPPERS
        earliest = self.next_cycle if overlaps else max(self.next_cycle, self.requant_free_at)
        earliest = max(earliest, self.blocked_until)
        feeder_idle_at = self.feeder_last_issue + 1
        bank = weight_bank(self.config, instruction)
        paired = self._paired(instruction, bank)
        pair_with, self.pair_with = self.pair_with, None
        if paired:   # in the cycle of the MATMUL before it, which took its own
            earliest = pair_with[1]
        elif op is Opcode.LOADW:
            earliest = max(earliest, self.load_next_at, self.inflight_clear_at[bank])
            if self.feeder_bank == bank:
                earliest = max(earliest, self._feeder_free_at(feeder_idle_at))
        elif op is Opcode.MATMUL:
            earliest = max(earliest, self.feeder_last_issue)
            if self.load_bank == bank:
                earliest = max(earliest, self.loaded_at)
        elif (op is Opcode.REQUANT and requant_waits_for_feed(self.config.requant_overlap,
                                                              bool(instruction["to_acc"]))
              or op is Opcode.RESCALE):   # the accumulate path to itself
            earliest = max(earliest, feeder_idle_at, self.drain_clear_at)
            if op is Opcode.RESCALE:
                earliest = max(earliest, self.table_free_at)
        elif op is Opcode.TABLE:
            earliest = max(earliest, self.table_free_at)
        elif op is Opcode.FILL and self.config.single_port_activations:
            earliest = max(earliest, feeder_idle_at)   # no write beside the feeder's reads
        elif op is Opcode.HALT:
            earliest = max(earliest, feeder_idle_at, self.drain_clear_at, self.load_free_at)
        if not paired:
            self.counters.stall_cycles += earliest - self.next_cycle
        cycle = earliest
        if op is Opcode.LOADW:
            self.load_bank = bank
            self.load_free_at = cycle + rows + WEIGHT_LOAD_STAGES
            self.load_next_at = cycle + load_next_cycles(self.config.load_rows, cols)
            self.loaded_at = cycle + weight_load_cycles(self.config.load_rows, cols)
        elif op is Opcode.MATMUL:
            if self.config.paired_loads and instruction.k_tile >= 0:
                self.pair_with = (instruction.k_tile, cycle, self.feeder_bank,
                                  self.feeder_last_issue)
            count = instruction["count"]
            last = cycle + count
            self.feeder_last_issue = last
            self.feeder_bank = bank
            self.inflight_clear_at[bank] = last + weight_use_cycles(
                self.config.load_rows, self.config.skew_cols, self.config.load_skew)
            self.drain_clear_at = last + results_written_cycles(self.config.array_rows,
                                                                self.config.skew_cols)
            self.counters.busy_cycles += count
            self.counters.macs += count * rows * cols
        elif op is Opcode.RESCALE:
            self.blocked_until = cycle + instruction["count"] + RESCALE_TAIL_CYCLES
        elif op is Opcode.TABLE:   # the requantizer's parameter port once it is idle
            self.requant_overlap = True
            start = self.requant_started_at = max(cycle, self.requant_free_at)
            self.requant_free_at = self.table_free_at = (
                start + self.config.table_load_cycles + TABLE_TAIL_CYCLES)
        elif op is Opcode.FILL:   # the requantizer's write port, with overlap
            self.requant_overlap = not self.config.single_port_activations
            self.requant_started_at = cycle
            self.requant_free_at = cycle + instruction["count"] + FILL_TAIL_CYCLES
        elif op is Opcode.REQUANT:
            self.requant_overlap = bool(self.config.requant_overlap and instruction["overlap"]
                                        and not instruction["to_acc"])
            groups = instruction["count"] * (cols // self.config.requant_lanes)
            # Dispatched beside the feeder, it starts once the rows before it are written.
            start = self.requant_started_at = max(cycle, self.drain_clear_at)
            if instruction["to_acc"]:
                # Reads every other cycle, unless the requantizer has a port of its own.
                last_read = groups if self.config.requant_overlap else 2 * groups - 1
                self.requant_free_at = start + last_read + REQUANT_TO_ACC_TAIL_CYCLES
            else:
                self.requant_free_at = start + requant_cycles(
                    groups, self.config.requant_product_cycles)
        self.next_cycle = cycle + 1
        if op is Opcode.HALT:
            self.counters.cycles = cycle + 1


@dataclass
class Walk:
    """An address walk: ``row_length`` words a row (0: one endless row), ``col_step``
    apart, rows ``row_step`` apart (SETWIN for activations, SETOUT for outputs)."""

    row_length: int = 0
    row_step: int = 0
    col_step: int = 1

    def offsets(self, count: int) -> np.ndarray:
        i = np.arange(count, dtype=np.int64)
        if self.row_length == 0:
            return i * self.col_step
        return (i // self.row_length) * self.row_step + (i % self.row_length) * self.col_step


class GemmState:
    """The registers of the sequencer that shape a step (SETGEMM, SETKERN, SETWIN,
    SETOUT) and the expansion of GEMM into LOADW/MATMUL steps. A start resets them."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.weight_addr = 0
        self.k_tiles = 0
        self.tile_step = 0
        self.tap_row = False   # SETGEMM tap_row: two weight tiles a K tile
        self.kernel_w = self.kernel_h = 1
        self.kernel_row_step = 0
        self.window = Walk()
        self.reduce = False
        self.depthwise = False
        self.pitch = self.drop = 0
        self.out = Walk()
        self.out_from_map = False   # SETOUT from_map: REQUANT to_acc reads a map

    def tap_offset(self, kt: int) -> int:
        """Activation offset of K tile ``kt``: kernel tap (x, y), then channel tile."""
        x = kt % self.kernel_w
        y = (kt // self.kernel_w) % self.kernel_h
        tile = kt // (self.kernel_w * self.kernel_h)
        return tile * self.tile_step + y * self.kernel_row_step + x

    def expand(self, ins: Instruction) -> list[Instruction]:
        """The steps an instruction dispatches as (itself, unless it is a GEMM); updates
        the registers as the hardware does."""
        op = ins.opcode
        if op is Opcode.SETGEMM:
            self.weight_addr, self.k_tiles = ins["weight_addr"], ins["k_tiles"]
            self.tile_step, self.tap_row = ins["tile_step"], bool(ins["tap_row"])
        elif op is Opcode.SETKERN:
            self.kernel_w, self.kernel_h = ins["kernel_w"], ins["kernel_h"]
            self.kernel_row_step = ins["kernel_row_step"]
        elif op is Opcode.SETWIN:
            self.window = Walk(ins["row_length"], ins["row_step"], ins["col_step"])
            self.reduce = bool(ins["reduce"])
            self.depthwise, self.pitch = bool(ins["depthwise"]), ins["pitch"]
            self.drop = ins["drop"]
        elif op is Opcode.SETOUT:
            self.out = Walk(ins["row_length"], ins["row_step"], 1)
            self.out_from_map = bool(ins["from_map"])
        if op is not Opcode.GEMM:
            return [ins]
        steps = []
        # With tap_row each K tile is two tiles, the second loaded first (its row for the
        # tap row stays there as the first's loads), and no LOADW pairs with a MATMUL.
        tiles = 2 if self.tap_row else 1
        for kt in range(self.k_tiles):
            bank = ins["bank"] ^ (kt & 1)
            tag = -1 if self.tap_row else kt
            first = self.weight_addr + kt * tiles * self.rows
            for tile in reversed(range(tiles)):
                steps.append(Instruction(Opcode.LOADW, {
                    "bank": bank, "weight_addr": (first + tile * self.rows) & 0xFFFF},
                    k_tile=tag))
            steps.append(Instruction(Opcode.MATMUL, {
                "bank": bank, "accumulate": int(ins["accumulate"] or kt > 0),
                "combine": ins["combine"],
                "act_addr": (ins["act_addr"] + self.tap_offset(kt)) & 0xFFFF,
                "acc_addr": ins["acc_addr"], "count": ins["count"]}, k_tile=tag))
        self.weight_addr = (self.weight_addr + self.k_tiles * tiles * self.rows) & 0xFFFF
        return steps


def depthwise_lead(config: NpuConfig, pitch: int) -> int:
    """Activation words a depthwise-mode MATMUL streams before its first result: the
    window's first G − 1 rows and two taps."""
    return (config.depthwise_groups - 1) * pitch + 2


def depthwise_drain_words(config: NpuConfig, pitch: int) -> int:
    """Words other MATMULs stream (a cycle each) after a depthwise MATMUL of ``pitch``
    before its last word has left the line buffers and the column chains, with room to
    spare: its lead, and two registers a PE down the rows."""
    return depthwise_lead(config, pitch) + 2 * config.array_rows


def matmul_results(config: NpuConfig, state: GemmState, ins: Instruction) -> int:
    """Accumulator words a MATMUL writes (its first word on): one in reduce mode, its
    count less the lead in the depthwise mode, else its count."""
    if state.reduce:
        return 1
    if state.depthwise:
        return int(depthwise_kept(config, state, ins["count"]).sum())
    return ins["count"]


def depthwise_kept(config: NpuConfig, state: GemmState, count: int) -> np.ndarray:
    """Which words of a depthwise-mode MATMUL of ``count`` words give a result: those
    past the lead, but for SETWIN's ``drop`` last results of every row."""
    i = np.arange(count)
    kept = i >= depthwise_lead(config, state.pitch)
    if state.drop:
        kept &= (i - 2) % state.pitch < state.pitch - state.drop
    return kept


def expand_program(config: NpuConfig, program: list[Instruction]) -> list[Instruction]:
    """Every dispatch of a program: GEMMs expanded into their LOADW/MATMUL steps."""
    state = GemmState(config.rows)
    return [step for ins in program for step in state.expand(ins)]


def weight_bank(config: NpuConfig, step: Instruction) -> int:
    """The weight bank a LOADW or MATMUL step uses: its ``bank`` field, or 0 on an NPU
    with one weight register per PE (``weight_banks`` 1), which reads every bank field
    as 0. Other instructions: 0."""
    if step.opcode not in (Opcode.LOADW, Opcode.MATMUL) or config.weight_banks == 1:
        return 0
    return step["bank"]


def requant_rounding(instruction: Instruction) -> str:
    """The rounding a REQUANT asks for, one of :data:`npugen.arith.ROUNDING_MODES`."""
    rounding = "single" if instruction["single_rounding"] else "double"
    return rounding + "_even" if instruction["ties_to_even"] else rounding


def check_program(config: NpuConfig, program: list[Instruction]) -> None:
    """Raise :class:`ProgramError` if an instruction reaches outside the memories or
    uses a count, lane or rounding the hardware cannot run; the message names the
    instruction."""

    def need(ok: bool, index: int, instruction: Instruction, why: str) -> None:
        if not ok:
            raise ProgramError(f"instruction {index} ({instruction}): {why}")

    if not program or program[-1].opcode is not Opcode.HALT:
        raise ProgramError("a program must end with HALT")
    if len(program) > config.instruction_depth:
        raise ProgramError(
            f"program has {len(program)} instructions, instruction memory holds "
            f"{config.instruction_depth} (instruction_depth)")
    state = GemmState(config.rows)
    overlap = _OverlapCheck(config)
    line_pitch = None   # the line buffers' pitch while a depthwise MATMUL may be in flight
    streamed = 0        # words other MATMULs streamed since (one a cycle)
    param_addr, param_walk = 0, 0   # SETREQ's, as the golden model starts
    loads = [0, 0]   # LOADWs of each bank since the start (the tap row's weight: the second)
    tables_loaded = False   # a TABLE since the start
    groups = config.cols // config.requant_lanes
    for index, instruction in enumerate(program):
        op = instruction.opcode
        if op is Opcode.SETREQ:
            param_addr, param_walk = instruction["param_addr"], instruction["param_walk"]
        elif op is Opcode.REQUANT:   # its words' parameters (param_walk: each word's own)
            end = param_addr + (instruction["count"] if param_walk else 1) * groups
            need(end <= config.param_depth, index, instruction,
                 f"parameter words end at word {end}, param_depth is {config.param_depth}")
        uses = [name for name in ("combine", "to_acc", "left_shift")
                if instruction.args.get(name)]
        if not config.feature_maps:
            if op in (Opcode.SETKERN, Opcode.SETWIN, Opcode.SETOUT, Opcode.FILL) or uses:
                what = op.name if not uses else f"{op.name} {', '.join(uses)}"
                need(False, index, instruction,
                     f"{what} needs an NPU generated with feature_maps (this one has none)")
        if op in (Opcode.TABLE, Opcode.RESCALE):
            need(config.rescale_tables, index, instruction,
                 f"{op.name} needs an NPU generated with rescale_tables (this one has "
                 f"rescale_tables = false); regenerate it with rescale_tables = true")
            need(op is Opcode.TABLE or tables_loaded, index, instruction,
                 "RESCALE before any TABLE of this run: its tables would hold another "
                 "run's entries; load them with a TABLE first")
            tables_loaded = True
        for name, option, built in (("combine", "max_pooling", config.max_combine),
                                    ("to_acc", "adds", config.requant_to_acc),
                                    ("left_shift", "adds", config.requant_to_acc)):
            if name in uses and not built:
                need(False, index, instruction,
                     f"{op.name} {name} needs an NPU generated with {option} (this one "
                     f"has {option} = false); regenerate it with {option} = true")
        if op is Opcode.GEMM:
            need(state.k_tiles >= 1, index, instruction, "k_tiles (SETGEMM) must be at least 1")
            need(instruction["count"] >= 1, index, instruction, "count must be at least 1")
            end = state.weight_addr + state.k_tiles * config.rows * (1 + state.tap_row)
            need(end <= config.weight_depth, index, instruction,
                 f"weight tiles end at word {end}, weight_depth is {config.weight_depth}")
        elif op is Opcode.SETKERN:
            need(instruction["kernel_w"] >= 1 and instruction["kernel_h"] >= 1, index,
                 instruction, "kernel_w and kernel_h must be at least 1")
        for ins in state.expand(instruction):
            _check_step(config, state, index, ins, need)
            overlap.step(state, index, ins, need)
            if ins.opcode is Opcode.LOADW:
                loads[weight_bank(config, ins)] += 1
            elif ins.opcode is Opcode.MATMUL and state.depthwise and config.depthwise_tap_row:
                need(loads[weight_bank(config, ins)] >= 2, index, ins,
                     f"a depthwise-mode MATMUL on bank {ins['bank']}, whose tap row holds a "
                     f"weight of no tile of this run: the tap row takes the bank's tile before "
                     f"the last, so load the bank twice first (SETGEMM tap_row does)")
            if ins.opcode is Opcode.REQUANT and not (config.requant_overlap
                                                     and ins["overlap"]):
                line_pitch = None   # the next step waits for it, and it for the drain
            elif ins.opcode is Opcode.MATMUL and state.depthwise:
                drain = depthwise_drain_words(config, line_pitch or 0)
                need(line_pitch in (None, state.pitch), index, ins,
                     f"a depthwise MATMUL of pitch {state.pitch} may start while one of "
                     f"pitch {line_pitch} is still in the line buffers; put a REQUANT "
                     f"without overlap (the next step waits for the array to drain) or "
                     f"MATMULs of {drain} words or more between them")
                line_pitch, streamed = state.pitch, 0
            elif ins.opcode is Opcode.MATMUL and line_pitch is not None:
                streamed += ins["count"]
                if streamed >= depthwise_drain_words(config, line_pitch):
                    line_pitch = None


def _check_step(config: NpuConfig, state: GemmState, index: int, ins: Instruction,
                need) -> None:
    def within(what: str, end: int, depth_name: str) -> None:
        depth = getattr(config, depth_name)
        need(end <= depth, index, ins, f"{what} end at word {end}, {depth_name} is {depth}")

    op = ins.opcode
    if op is Opcode.LOADW:
        within("weight tile rows", ins["weight_addr"] + config.rows, "weight_depth")
        need(config.weight_segments == 1 or ins["weight_addr"] % config.rows == 0, index, ins,
             f"weight_addr {ins['weight_addr']} is not a multiple of rows ({config.rows}), "
             f"which an NPU generated with weight_segments = {config.weight_segments} needs "
             f"(its address bits pick each row's memory part)")
    elif op in (Opcode.MATMUL, Opcode.REQUANT, Opcode.RESCALE):
        need(ins["count"] >= 1, index, ins, "count must be at least 1")
        if op is Opcode.MATMUL and state.depthwise:
            _check_depthwise(config, state, index, ins, need)
        written = matmul_results(config, state, ins) if op is Opcode.MATMUL else ins["count"]
        if not (op is Opcode.REQUANT and ins["to_acc"] and state.out_from_map):
            within("accumulator words", ins["acc_addr"] + written, "accumulator_depth")
    if op is Opcode.REQUANT and config.rounding == "double":
        need(not ins["ties_to_even"], index, ins,
             "ties_to_even=1, but this NPU was generated with rounding = 'double' only, "
             "which rounds halves away from zero; regenerate the NPU with rounding = 'both'")
    if op is Opcode.REQUANT and config.rounding != "both":
        asked = requant_rounding(ins).removesuffix("_even")
        need(asked == config.rounding, index, ins,
             f"single_rounding={ins['single_rounding']} asks for {asked} rounding, but this NPU "
             f"was generated with rounding = {config.rounding!r} only; regenerate the NPU with "
             f"rounding = 'both' (or set single_rounding to "
             f"{int(config.rounding == 'single')})")
    if op in (Opcode.MATMUL, Opcode.RESCALE):
        last = ins["act_addr"] + int(state.window.offsets(ins["count"]).max())
        within("activations", last + 1, "activation_depth")
    if op is Opcode.RESCALE:
        need(not (state.reduce or state.depthwise), index, ins,
             "SETWIN set reduce or the depthwise mode, which RESCALE does not have; give "
             "it a SETWIN without them")
    elif op is Opcode.TABLE:
        within("the tables' parameter words", ins["param_addr"] + config.table_param_words,
               "param_depth")
    elif op is Opcode.SETGEMM:
        need(not ins["tap_row"] or config.depthwise_tap_row, index, ins,
             "tap_row=1, but this NPU was generated without the depthwise tap row "
             "(depthwise_tap_row = false); clear the bit, or regenerate the NPU with "
             "depthwise_tap_row = true")
    elif op is Opcode.SETPP:
        need(ins["clamp_min"] <= ins["clamp_max"], index, ins,
             "clamp_min must not exceed clamp_max")
    elif op is Opcode.FILL:
        need(ins["count"] >= 1, index, ins, "count must be at least 1")
        within("words filled", int(fill_words(ins).max()) + 1, "activation_depth")
        low, high = -(1 << (config.input_width - 1)), (1 << (config.input_width - 1)) - 1
        need(low <= ins["value"] <= high, index, ins,
             f"value must be an int{config.input_width} ({low} to {high})")
    elif op is Opcode.SETOUT:
        need(not ins["from_map"] or config.requant_from_map, index, ins,
             f"from_map=1, but only NPUs generated with requant_overlap and feature_maps on "
             f"a square array with a requantizer lane per column read a REQUANT's source "
             f"from a map (this one: {config.rows}×{config.cols}, requant_lanes="
             f"{config.requant_lanes}, requant_overlap={config.requant_overlap}); clear "
             f"the bit and bring the map into the accumulators with a MATMUL")
    elif op is Opcode.REQUANT and ins["to_acc"] and state.out_from_map:
        last = ins["acc_addr"] + int(state.out.offsets(ins["count"]).max())
        within("source activations", last + 1, "activation_depth")
        within("accumulator words written", ins["out_addr"] + ins["count"],
               "accumulator_depth")
    elif op is Opcode.REQUANT and ins["to_acc"]:
        source, target = ins["acc_addr"], ins["out_addr"]
        within("accumulator words written", target + ins["count"], "accumulator_depth")
        need(target == source or target + ins["count"] <= source
             or source + ins["count"] <= target, index, ins,
             "to_acc output words must be the source words or not overlap them")
    elif op is Opcode.REQUANT:
        need(not state.out_from_map, index, ins,
             "SETOUT's from_map is 1, which only a REQUANT to_acc reads; set it to 0 with "
             "a SETOUT before this REQUANT")
        lanes = config.requant_lanes
        need(ins["out_lane"] < config.rows and ins["out_lane"] % lanes == 0, index, ins,
             f"out_lane must be a multiple of requant_lanes ({lanes}) below rows "
             f"({config.rows})")


def _check_depthwise(config: NpuConfig, state: GemmState, index: int, ins: Instruction,
                     need) -> None:
    depth = config.line_buffer_depth
    need(depth > 0, index, ins, "SETWIN set the depthwise mode, but this NPU was generated "
         "without it (line_buffer_depth = 0); regenerate it with line_buffer_depth set or "
         "clear the bit")
    need(4 <= state.pitch <= depth, index, ins,
         f"the depthwise mode's pitch (SETWIN) is {state.pitch}; the line buffers take 4 to "
         f"{depth} (line_buffer_depth)")
    need(state.drop < state.pitch, index, ins,
         f"the depthwise mode drops {state.drop} results a row of {state.pitch} (SETWIN "
         f"drop, pitch): it must keep at least one")
    need(not state.reduce, index, ins, "the depthwise mode cannot go with reduce (SETWIN)")
    lead = depthwise_lead(config, state.pitch)
    need(matmul_results(config, state, ins) >= 1, index, ins,
         f"count must give a result past the depthwise mode's lead of {lead} words (pitch "
         f"{state.pitch}) and the words it drops")


def fill_words(ins: Instruction) -> np.ndarray:
    """The activation words FILL ``ins`` writes, in order."""
    return ins["out_addr"] + Walk(ins["row_length"], ins["row_step"], 1).offsets(ins["count"])


def requant_output_words(config: NpuConfig, ins: Instruction, out_stride: int,
                         out: Walk) -> np.ndarray:
    """The activation word each result of REQUANT ``ins`` goes to, (count, cols): lane
    ``out_lane`` + j of word ``out_addr`` + the SETOUT walk's offset, past the last lane
    in the next word block (+``out_stride``)."""
    lanes = ins["out_lane"] + np.arange(config.cols)
    offsets = out.offsets(ins["count"])[:, None]
    return (ins["out_addr"] + (lanes // config.rows) * out_stride + offsets) % address_span(
        config.activation_depth)


class _OverlapCheck:
    """The words a REQUANT with ``overlap``, or a FILL, still reads and writes while the
    steps after it dispatch: an overlapping MATMUL must not write its accumulator words nor read its
    output words (the NPU does not wait for them; the program would then depend on
    timing, and the golden model, which runs one instruction after the other, would
    differ from the hardware)."""

    def __init__(self, config: NpuConfig) -> None:
        self.config = config
        self.out_stride = 0
        self.open: tuple[int, Instruction, range, set[int]] | None = None

    def step(self, state: GemmState, index: int, ins: Instruction, need) -> None:
        c, op = self.config, ins.opcode
        if op is Opcode.SETREQ:
            self.out_stride = ins["out_stride"]
        if self.open is not None and op not in REQUANT_OVERLAPPERS:
            self.open = None
        if op is Opcode.FILL and not c.single_port_activations:   # beside the steps after it
            self.open = (index, ins, range(0), set(fill_words(ins).tolist()))
        elif op is Opcode.REQUANT and ins["overlap"]:
            need(c.requant_overlap, index, ins,
                 "overlap=1, but this NPU was generated with requant_overlap = false; "
                 "regenerate it with requant_overlap = true or clear the bit")
            need(not ins["to_acc"], index, ins, "overlap=1 cannot go with to_acc=1")
            written = set(requant_output_words(c, ins, self.out_stride, state.out)
                          .ravel().tolist())
            self.open = (index, ins, range(ins["acc_addr"], ins["acc_addr"] + ins["count"]),
                         written)
        elif op in (Opcode.MATMUL, Opcode.RESCALE) and self.open is not None:
            at, requant, accumulators, written = self.open
            last = ins["acc_addr"] + (matmul_results(c, state, ins) if op is Opcode.MATMUL
                                      else ins["count"])
            need(last <= accumulators.start or ins["acc_addr"] >= accumulators.stop, index,
                 ins, f"writes accumulator words {ins['acc_addr']} to {last - 1}, which the "
                      f"overlapping REQUANT of instruction {at} ({requant}) reads; give them "
                      f"other words or clear its overlap bit")
            read = ins["act_addr"] + state.window.offsets(ins["count"])
            fix = ("clear its overlap bit" if requant.opcode is Opcode.REQUANT else
                   "move the FILL after an instruction that waits for it")
            need(written.isdisjoint(read.tolist()), index, ins,
                 f"reads activation words that the overlapping {requant.opcode.name} of "
                 f"instruction {at} ({requant}) writes; {fix}")


def overlap_requants(config: NpuConfig, program: list[Instruction]) -> list[Instruction]:
    """``program`` with the ``overlap`` bit set on every REQUANT (not ``to_acc``) that the
    steps after it may run beside, by the rules :func:`check_program` enforces: an
    add's next chunk, or a layer that neither reads the REQUANT's output nor writes the
    accumulator words it reads. Unchanged on an NPU without ``requant_overlap``."""
    if not config.requant_overlap:
        return list(program)
    program = list(program)
    state, out_stride = GemmState(config.rows), 0

    def refuse(ok: bool, *_) -> None:
        if not ok:
            raise ProgramError

    for index, instruction in enumerate(program):
        if (instruction.opcode is Opcode.REQUANT and not instruction["overlap"]
                and not instruction["to_acc"] and index + 1 < len(program)
                and program[index + 1].opcode in REQUANT_OVERLAPPERS):
            trial = Instruction(Opcode.REQUANT, {**instruction.args, "overlap": 1})
            check, ahead = _OverlapCheck(config), copy.deepcopy(state)
            check.out_stride = out_stride
            try:
                for at, step in enumerate([trial, *program[index + 1:]], index):
                    if at > index and step.opcode not in REQUANT_OVERLAPPERS:
                        break
                    for ins in ahead.expand(step):
                        check.step(ahead, at, ins, refuse)
            except ProgramError:
                pass
            else:
                program[index] = instruction = trial
        if instruction.opcode is Opcode.SETREQ:
            out_stride = instruction["out_stride"]
        state.expand(instruction)
    return program


class GoldenNpu:
    """The NPU's state and instruction semantics."""

    def __init__(self, config: NpuConfig) -> None:
        self.config = c = config
        self.instructions = np.zeros(c.instruction_depth, dtype=np.uint64)
        self.activations = np.zeros((c.activation_depth, c.rows), dtype=np.int64)
        self.weights = np.zeros((c.weight_depth, c.cols), dtype=np.int64)
        self.accumulators = np.zeros((c.accumulator_depth, c.cols), dtype=np.int64)
        # Parameter lanes: one value per field of layouts.PARAM_LANE_FIELDS per channel.
        self.params = np.zeros((c.param_depth, c.requant_lanes, len(PARAM_LANE_FIELDS)),
                               dtype=np.int64)
        # Each bank's rows and, with depthwise_tap_row, the tap row's weight.
        self.banks = np.zeros((2, c.array_rows, c.cols), dtype=np.int64)
        self.zero_point = self.clamp_min = self.clamp_max = 0
        self.param_addr = self.out_stride = self.param_walk = 0
        self.state = GemmState(c.rows)
        # The rescale tables (rescale_tables): not a memory of the host's; TABLE loads them.
        self.tables = np.zeros((2, c.table_entries), dtype=np.int64)

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
        # Decoded up to the first HALT only: the words past it never run, as on the NPU.
        program = []
        for word in self.instructions[start_pc:]:
            program.append(Instruction.decode(int(word)))
            if program[-1].opcode is Opcode.HALT:
                break
        else:
            raise ProgramError(f"no HALT after instruction {start_pc}")
        check_program(self.config, program)
        timing = CycleModel(self.config)
        self.state = GemmState(self.config.rows)
        for instruction in program:
            for ins in self.state.expand(instruction):
                self.execute(ins)
                timing.dispatch(ins)
        return timing.counters.as_counted_by(self.config)

    def execute(self, ins: Instruction) -> None:
        c = self.config
        op = ins.opcode
        if op is Opcode.LOADW:
            base, bank = ins["weight_addr"], self.banks[weight_bank(c, ins)]
            if c.depthwise_tap_row:   # the top row of the last segment shifts down into it
                bank[c.rows] = bank[c.rows - c.load_rows]
            bank[:c.rows] = self.weights[base:base + c.rows]
        elif op is Opcode.MATMUL:
            self._matmul(ins)
        elif op is Opcode.REQUANT:
            self._requant(ins)
        elif op is Opcode.SETPP:
            self.zero_point = ins["zero_point"]
            self.clamp_min = ins["clamp_min"]
            self.clamp_max = ins["clamp_max"]
        elif op is Opcode.SETREQ:
            self.param_addr = ins["param_addr"]
            self.out_stride = ins["out_stride"]
            self.param_walk = ins["param_walk"]
        elif op is Opcode.FILL:
            self.activations[fill_words(ins)] = ins["value"]
        elif op is Opcode.TABLE:
            self._table(ins)
        elif op is Opcode.RESCALE:
            self._rescale(ins)

    def _table(self, ins: Instruction) -> None:
        c = self.config
        words = self.params[ins["param_addr"]:ins["param_addr"] + c.table_param_words]
        names = [f.name for f in param_lane_fields(c.accumulator_width)]
        for table, name in enumerate(TABLE_FIELDS):
            entries = words[:, :, names.index(name)].reshape(-1)[:c.table_entries]
            self.tables[table] = wrap(entries, c.accumulator_width)

    def _rescale(self, ins: Instruction) -> None:
        c = self.config
        words = (ins["act_addr"] + self.state.window.offsets(ins["count"])) % address_span(
            c.activation_depth)
        index = self.activations[words, :c.cols] & (c.table_entries - 1)
        rows = self.tables[ins["table"]][index]
        target = slice(ins["acc_addr"], ins["acc_addr"] + ins["count"])
        if ins["accumulate"]:
            rows = rows + self.accumulators[target]
        self.accumulators[target] = wrap(rows, c.accumulator_width)

    def _matmul(self, ins: Instruction) -> None:
        c, state = self.config, self.state
        words = ins["act_addr"] + state.window.offsets(ins["count"])
        bank = self.banks[weight_bank(c, ins)]
        if state.depthwise:
            products = self._depthwise_products(self.activations[words], bank)
        else:
            products = wrap(self.activations[words] @ bank[:c.rows], c.accumulator_width)
        combine = np.maximum if ins["combine"] else np.add
        if state.reduce:  # every row into one word, each after the first combined
            products = combine.reduce(products, axis=0, keepdims=True)
        target = slice(ins["acc_addr"], ins["acc_addr"] + len(products))
        if ins["accumulate"]:
            products = combine(products, self.accumulators[target])
        self.accumulators[target] = wrap(products, c.accumulator_width)

    def _depthwise_products(self, words: np.ndarray, bank: np.ndarray) -> np.ndarray:
        """The depthwise mode's result rows (MATMUL in docs/ISA.md): per column c, the
        window of weight rows 3g + j over lane c of word i − g·pitch − j."""
        c = self.config
        lead = depthwise_lead(c, self.state.pitch)
        lanes = words[:, :c.cols]
        sums = np.zeros((len(words) - lead, c.cols), dtype=np.int64)
        for g in range(c.depthwise_groups):
            for j in range(3):
                back = g * self.state.pitch + j
                sums += lanes[lead - back:len(words) - back] * bank[3 * g + j]
        kept = depthwise_kept(c, self.state, len(words))[lead:]
        return wrap(sums[kept], c.accumulator_width)

    def _requant(self, ins: Instruction) -> None:
        c = self.config
        count = ins["count"]
        groups = c.cols // c.requant_lanes
        # Every word's groups (param_walk: word i's from param_addr + i·groups on).
        first = self.param_addr + (np.arange(count)[:, None] * groups if self.param_walk
                                   else np.zeros((1, 1), dtype=np.int64))
        param_words = (first + np.arange(groups)) % address_span(c.param_depth)
        params = self.params[param_words].reshape(len(first), c.cols, len(PARAM_LANE_FIELDS))
        # Each field by name, as many low bits as the requantizer reads.
        p = {f.name: params[..., i] & ((1 << f.read_width) - 1) if f.read_width < f.width
             else params[..., i] for i, f in enumerate(param_lane_fields(c.accumulator_width))}
        if ins["to_acc"] and self.state.out_from_map:
            words = (ins["acc_addr"] + self.state.out.offsets(count)) % address_span(
                c.activation_depth)
            acc = self.activations[words, :c.cols].astype(np.int64)
        else:
            acc = self.accumulators[ins["acc_addr"]:ins["acc_addr"] + count]
        if ins["to_acc"]:
            raw = requantize_raw(acc, p["bias"], p["multiplier"], p["shift"],
                                 self.zero_point, accumulator_width=c.accumulator_width,
                                 rounding=requant_rounding(ins), left_shift=ins["left_shift"])
            target = slice(ins["out_addr"], ins["out_addr"] + count)
            if ins["accumulate"]:
                raw = raw + self.accumulators[target]
            self.accumulators[target] = wrap(raw, c.accumulator_width)
            return
        out = requantize(
            acc, p["bias"], p["multiplier"], p["shift"], self.zero_point,
            self.clamp_min, self.clamp_max,
            accumulator_width=c.accumulator_width, output_width=c.input_width,
            rounding=requant_rounding(ins), left_shift=ins["left_shift"])
        words = requant_output_words(c, ins, self.out_stride, self.state.out)
        lanes = (ins["out_lane"] + np.arange(c.cols)) % c.rows
        for i in range(count):
            self.activations[words[i], lanes] = out[i]
