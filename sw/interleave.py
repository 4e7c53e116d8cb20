"""Interleave a program's GEMMs with its REQUANTs across layers, so that the array does
not wait for the requantizer.

The sequencer dispatches in order, and a REQUANT (with the SETREQ before it) waits for
the REQUANT before it to finish. Where a layer's requantization takes longer than its
array work (a depthwise layer makes as many outputs as a convolution from a ninth of the
MACs), the array idles before each REQUANT, though GEMMs further on (the next output
tile, the next layer's first input-channel tiles) could already run. :func:`interleave`
moves such GEMMs ahead of the REQUANT, one input-channel tile at a time, where they read
no activation word that a REQUANT or FILL not yet finished writes and touch no
accumulator word that an instruction before them still uses. REQUANTs, FILLs and every
other instruction keep their order; the walk and requantizer registers (SETGEMM, SETKERN,
SETWIN, SETPP, SETREQ, SETOUT) are set again where a moved instruction needs other
values. The result computes what the program computes, instruction by instruction in
the golden model's order; the compiler keeps it only where the cycle model counts fewer
cycles and :func:`npugen.golden.check_program` accepts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import NpuConfig
from .golden import (
    CycleModel,
    GemmState,
    ProgramError,
    check_program,
    expand_program,
    fill_words,
    matmul_results,
    overlap_requants,
    requant_output_words,
)
from .isa import Instruction, Opcode

__all__ = ["interleave"]

#: Later GEMMs :func:`interleave` looks at for one to move ahead.
LOOKAHEAD = 48

_SETTERS = (Opcode.SETGEMM, Opcode.SETKERN, Opcode.SETWIN, Opcode.SETOUT, Opcode.SETPP,
            Opcode.SETREQ)
#: SETGEMM's fields, in the order :class:`_Registers` keeps them.
_GEMM_FIELDS = ("weight_addr", "k_tiles", "tile_step", "tap_row")


def _mask(words: np.ndarray, depth: int) -> int:
    """A set of memory words as the bits of an int."""
    bits = np.zeros(depth, dtype=bool)
    bits[np.asarray(words, dtype=np.int64) % depth] = True
    return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")


def _span(start: int, count: int) -> int:
    return ((1 << count) - 1) << start


def _gemm_words(config: NpuConfig, state: GemmState, gemm: Instruction) -> tuple[int, int]:
    """The activation words a GEMM reads and the accumulator words it writes (``state``
    expands it, as the sequencer does)."""
    reads = writes = 0
    for step in state.expand(gemm):
        if step.opcode is Opcode.MATMUL:
            words = step["act_addr"] + state.window.offsets(step["count"])
            reads |= _mask(words, config.activation_depth)
            writes |= _span(step["acc_addr"], matmul_results(config, state, step))
    return reads, writes


@dataclass
class _Unit:
    """A GEMM (``kind`` "A"), a REQUANT ("R"), a FILL ("F"), a TABLE ("T": it touches
    neither memory, and dispatches beside the REQUANT before it) or any other instruction
    ("B", which nothing moves past), with the register values it runs with and the
    words it reads and writes (activations, accumulators; bits of an int)."""

    kind: str
    origin: int                    # index of its instruction in the program
    instruction: Instruction
    registers: dict[Opcode, tuple] = field(default_factory=dict)
    act_reads: int = 0
    act_writes: int = 0
    acc_reads: int = 0
    acc_writes: int = 0


class _Registers:
    """The values of the registers SETGEMM ... SETOUT set, as a start leaves them (None:
    not set since the start, which a moved instruction cannot be given back)."""

    def __init__(self) -> None:
        self.values: dict[Opcode, tuple | None] = dict.fromkeys(_SETTERS)
        self.gemm = (0, 0, 0, 0)   # SETGEMM's _GEMM_FIELDS (a GEMM advances the pointer)

    def set(self, ins: Instruction) -> None:
        if ins.opcode is Opcode.SETGEMM:
            self.gemm = tuple(ins[name] for name in _GEMM_FIELDS)
        else:
            self.values[ins.opcode] = tuple(sorted(ins.args.items()))


def _units(config: NpuConfig, program: list[Instruction]) -> list[_Unit]:
    state, registers = GemmState(config.rows), _Registers()
    act, acc = config.activation_depth, config.accumulator_depth
    out_stride, units = 0, []
    for index, ins in enumerate(program):
        op = ins.opcode
        if op in _SETTERS:
            registers.set(ins)
            out_stride = ins["out_stride"] if op is Opcode.SETREQ else out_stride
            state.expand(ins)
            continue
        context = {code: registers.values[code] for code in _SETTERS
                   if code is not Opcode.SETGEMM and registers.values[code] is not None}
        context[Opcode.SETGEMM] = registers.gemm
        if op is Opcode.GEMM:
            unit = _Unit("A", index, ins, {
                Opcode.SETGEMM: registers.gemm, Opcode.SETKERN: registers.values[Opcode.SETKERN],
                Opcode.SETWIN: registers.values[Opcode.SETWIN]})
            unit.act_reads, unit.acc_writes = _gemm_words(config, state, ins)
            unit.acc_reads = unit.acc_writes
            registers.gemm = (state.weight_addr, *registers.gemm[1:])
            if None in (unit.registers[Opcode.SETKERN], unit.registers[Opcode.SETWIN]):
                unit.kind = "B"
        elif op is Opcode.REQUANT:
            unit = _Unit("R", index, ins, {
                code: registers.values[code] for code in (Opcode.SETPP, Opcode.SETREQ,
                                                          Opcode.SETOUT)})
            count = ins["count"]
            if ins["to_acc"] and state.out_from_map:
                unit.act_reads = _mask(ins["acc_addr"] + state.out.offsets(count), act)
            else:
                unit.acc_reads = _span(ins["acc_addr"], count)
            if ins["to_acc"]:
                unit.acc_writes = _span(ins["out_addr"], count)
            else:
                unit.act_writes = _mask(requant_output_words(config, ins, out_stride,
                                                             state.out).ravel(), act)
            if None in unit.registers.values():
                unit.kind = "B"
        elif op is Opcode.FILL:
            unit = _Unit("F", index, ins, act_writes=_mask(fill_words(ins), act))
        elif op is Opcode.TABLE:   # no words: GEMMs move past it, it waits for nothing
            unit = _Unit("T", index, ins)
        else:
            unit = _Unit("B", index, ins)
        if unit.kind == "B" and op is not Opcode.HALT:   # registers as they are here
            unit.registers = context
        if unit.kind == "B":   # with everything it may touch
            unit.act_reads = unit.act_writes = _span(0, act)
            unit.acc_reads = unit.acc_writes = _span(0, acc)
        units.append(unit)
    return units


def _conflict(later: _Unit, earlier: _Unit) -> bool:
    """Whether GEMM ``later`` must stay after ``earlier``: it reads words that one
    writes, or they share accumulator words (a GEMM reads and writes its own)."""
    return bool(later.act_reads & earlier.act_writes
                or later.acc_writes & (earlier.acc_reads | earlier.acc_writes))


def _first_part(config: NpuConfig, unit: _Unit) -> tuple[_Unit, _Unit] | None:
    """A GEMM of several input-channel tiles as its first tile's GEMM and the rest's
    (which accumulates); None for one of a single tile."""
    weight_addr, k_tiles, tile_step, tap_row = unit.registers[Opcode.SETGEMM]
    kern = dict(unit.registers[Opcode.SETKERN])
    win = dict(unit.registers[Opcode.SETWIN])
    taps = kern["kernel_w"] * kern["kernel_h"]
    if win.get("depthwise") or tap_row or k_tiles <= taps or k_tiles % taps:
        return None
    parts = []
    for start, tiles, step in ((0, taps, 0), (taps, k_tiles - taps, tile_step)):
        gemm = Instruction(Opcode.GEMM, {**unit.instruction.args,
                                         "act_addr": unit.instruction["act_addr"] + step,
                                         "accumulate": int(unit.instruction["accumulate"]
                                                           or start > 0)})
        registers = {**unit.registers,
                     Opcode.SETGEMM: (weight_addr + start * config.rows, tiles, tile_step, 0)}
        parts.append(_Unit("A", unit.origin, gemm, registers))
    state = GemmState(config.rows)
    for part in parts:
        for code in (Opcode.SETKERN, Opcode.SETWIN):
            state.expand(Instruction(code, dict(part.registers[code])))
        state.expand(Instruction(Opcode.SETGEMM, dict(zip(
            _GEMM_FIELDS, part.registers[Opcode.SETGEMM], strict=True))))
        part.act_reads = _gemm_words(config, state, part.instruction)[0]
        part.acc_reads = part.acc_writes = unit.acc_writes
    return parts[0], parts[1]


class _Emitter:
    """The reordered program, its origins, and the cycle model and registers after it."""

    def __init__(self, config: NpuConfig, timing: NpuConfig) -> None:
        self.config = config
        self.program: list[Instruction] = []
        self.origins: list[int] = []
        self.timing = CycleModel(timing)
        self.state = GemmState(config.rows)
        self.registers = _Registers()
        self.bank = 0
        self.open: _Unit | None = None   # a REQUANT or FILL no instruction waited for

    def _put(self, ins: Instruction, origin: int) -> None:
        self.program.append(ins)
        self.origins.append(origin)
        if ins.opcode in _SETTERS:
            self.registers.set(ins)
        if ins.opcode is Opcode.REQUANT and self.config.requant_overlap \
                and not ins["to_acc"]:
            # As overlap_requants will set it, where the next steps allow (interleave
            # moves only GEMMs that do).
            ins = Instruction(Opcode.REQUANT, {**ins.args, "overlap": 1})
        for step in self.state.expand(ins):
            self.timing.dispatch(step)

    def emit(self, unit: _Unit) -> None:
        for code, value in unit.registers.items():
            if code is Opcode.SETGEMM:
                if self.registers.gemm != value:
                    self._put(Instruction(code, dict(zip(_GEMM_FIELDS, value, strict=True))),
                              unit.origin)
            elif self.registers.values[code] != value:
                self._put(Instruction(code, dict(value)), unit.origin)
        if self.waits_for_open(unit):
            self._fence(unit.origin)
        ins = unit.instruction
        if unit.kind == "A":
            ins = Instruction(Opcode.GEMM, {**ins.args, "bank": self.bank})
            self.bank ^= self.registers.gemm[1] & 1
        elif ins.opcode is Opcode.REQUANT:
            ins = Instruction(Opcode.REQUANT, {**ins.args, "overlap": 0})
        self._put(ins, unit.origin)
        if ins.opcode is Opcode.GEMM:
            self.registers.gemm = (self.state.weight_addr, *self.registers.gemm[1:])
        if unit.kind in "RF":
            self.open = unit
        elif unit.kind == "B":
            self.open = None

    def _fence(self, origin: int) -> None:
        """An instruction that waits for the REQUANT or FILL still running (a requantizer
        register set to its value again), so that the steps between them may overlap it
        (:func:`npugen.golden.overlap_requants`) and the next may not."""
        for code in (Opcode.SETREQ, Opcode.SETPP, Opcode.SETOUT):
            if self.registers.values[code] is not None:
                self._put(Instruction(code, dict(self.registers.values[code])), origin)
                break
        else:
            raise ProgramError("no requantizer register to wait with")
        self.open = None

    def waits_for_open(self, unit: _Unit) -> bool:
        """Whether GEMM ``unit`` would wait for the REQUANT or FILL still running."""
        return unit.kind == "A" and self.open is not None and bool(
            unit.act_reads & self.open.act_writes or unit.acc_writes & self.open.acc_reads)

    def requant_waits(self) -> bool:
        """Whether a REQUANT or FILL dispatched now would keep the array idle."""
        return self.timing.requant_free_at > self.timing.feeder_last_issue + 1


def interleave(config: NpuConfig, program: list[Instruction]
               ) -> tuple[list[Instruction], list[int]]:
    """``program`` (ending in HALT, its REQUANTs' overlap bits as the lowering set them)
    with GEMMs moved ahead of REQUANTs that would keep the array waiting, the overlap
    bits set again (:func:`npugen.golden.overlap_requants`), and for each instruction
    the index of the one it comes from. ``program`` itself (with ``overlap_requants``'s
    bits) when the result would be no faster, would not fit, or cannot be checked."""
    program = [Instruction(i.opcode, dict(i.args)) for i in program]
    original = overlap_requants(config, program)
    unchanged = original, list(range(len(original)))
    if not config.requant_overlap:
        return unchanged
    best, best_cycles = unchanged, _cycles(config, original)
    for timing in _timings(config):
        try:
            emitter = _schedule(config, _units(config, program), timing)
            result = overlap_requants(config, [
                Instruction(i.opcode, {**i.args, "overlap": 0})
                if i.opcode is Opcode.REQUANT else i for i in emitter.program])
            check_program(config, result)
        except ProgramError:
            continue
        cycles = _cycles(config, result)
        if cycles < best_cycles:
            best, best_cycles = (result, emitter.origins), cycles
    return best


def _timings(config: NpuConfig) -> list[NpuConfig]:
    """The configurations whose cycle model guides :func:`_schedule`'s moves: the NPU's
    own, and for weights in segments also one loading whole tiles. The moves are greedy,
    and a tile that loads sooner can lead them to a schedule the requantizer finishes
    later (KWS on a 16×16 with eight lanes and four segments: 13,982 cycles, 13,524
    guided by whole-tile loads); each result is timed on the NPU's own model."""
    timings = [config]
    if config.weight_segments > 1:
        timings.append(config.replace(weight_segments=1))
    return timings


def _schedule(config: NpuConfig, units: list[_Unit], timing: NpuConfig) -> _Emitter:
    """The units in their order, but for GEMMs moved ahead of one that would wait for
    the requantizer while the array idles (as ``timing``'s cycle model counts)."""
    done = [False] * len(units)
    emitter = _Emitter(config, timing)
    position = 0
    while position < len(units):
        unit = units[position]
        if unit.kind in "RF" or emitter.waits_for_open(unit):
            while emitter.requant_waits():
                moved = _movable(config, units, done, position, emitter)
                if moved is None:
                    break
                emitter.emit(moved)
        emitter.emit(unit)
        done[position] = True
        while position < len(units) and done[position]:
            position += 1
    return emitter


def _movable(config: NpuConfig, units: list[_Unit], done: list[bool], position: int,
             emitter: _Emitter) -> _Unit | None:
    """The first GEMM within :data:`LOOKAHEAD` after ``position`` that may run now (its
    first input-channel tile, where that one may and the rest may not), marked done or
    replaced by its rest."""
    seen = 0
    for index in range(position + 1, len(units)):
        unit = units[index]
        if done[index]:
            continue
        if unit.kind == "B" or seen >= LOOKAHEAD:
            return None
        if unit.kind != "A":
            continue
        seen += 1
        candidate, rest = _first_part(config, unit) or (unit, None)
        blocked = any(_conflict(candidate, units[before])
                      for before in range(position, index) if not done[before])
        if blocked or emitter.waits_for_open(candidate):
            continue
        if rest is None:
            done[index] = True
        else:
            units[index] = rest
        return candidate
    return None


def _cycles(config: NpuConfig, program: list[Instruction]) -> int:
    timing = CycleModel(config)
    for step in expand_program(config, program):
        timing.dispatch(step)
    return timing.counters.cycles

