"""Feature maps made in place: a layer's output over the input it is the last to read.

A layer whose input map dies with it may write its output into the input's words, as
long as no word is written before the layer has read it for the last time. The gap is
taken from the layer's own instructions (any operator, any lowering), by the rules the
sequencer keeps (docs/ARCHITECTURE.md, "Issue rules"): a REQUANT starts once every row issued
before it is written, so only the MATMULs after it may still read while it writes; a
FILL waits for the REQUANT before it, so the MATMULs after that one may
(:func:`in_place_gap`). The output's halo is written after the layer's last REQUANT
(``Lowering.fill_halo_now``, with an instruction that waits for the FILLs before the next
layer reads them). The compiler's interleaving only moves MATMULs earlier, past
REQUANTs, which they then finish before.

The golden model runs one instruction after the other; with the gap every read of the
input finds the value the layer before wrote, in that order and on the NPU, whatever
the timing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .config import NpuConfig
from .featuremap import FeatureMap
from .golden import GemmState, fill_words, requant_output_words
from .isa import Instruction, Opcode

__all__ = ["in_place_gap", "in_place_conflict", "ADDRESS_SPACE"]

#: The addresses an instruction reaches (16-bit fields): the analysis places maps in it.
ADDRESS_SPACE = 1 << 16
_NONE = 1 << 40   # no read of the input: no bound on the writes


def in_place_gap(config: NpuConfig, instructions: list[Instruction], src: FeatureMap,
                 dst: FeatureMap) -> int:
    """The least ``gap`` ≥ 0 such that ``dst`` at ``src.base − gap`` keeps every read of
    ``src`` by ``instructions`` (one layer's, its output's halo FILLs last; ``src`` and
    ``dst`` apart) before any write of the same word: every word a REQUANT writes into
    ``dst`` lies below every ``src`` word that a MATMUL after it reads, and every word a
    FILL writes below those read after the REQUANT before the FILL."""
    wide = dataclasses.replace(config, activation_depth=ADDRESS_SPACE)
    state, out_stride = GemmState(config.rows), 0
    reads: list[int] = []                # per MATMUL, the least src offset it reads
    writes: list[tuple[int, int]] = []   # (the first MATMUL that may read, highest offset)
    after_requant = 0                    # MATMULs before the last REQUANT, and it
    for instruction in instructions:
        for ins in state.expand(instruction):
            op = ins.opcode
            if op is Opcode.SETREQ:
                out_stride = ins["out_stride"]
            elif op is Opcode.MATMUL:
                words = ins["act_addr"] + state.window.offsets(ins["count"])
                inside = words[(words >= src.base) & (words < src.end)]
                reads.append(int(inside.min()) - src.base if inside.size else _NONE)
            elif op is Opcode.REQUANT:
                if ins["to_acc"]:
                    raise ValueError("an operator that requantizes into the accumulators "
                                     "(an add) is not made in place")
                after_requant = len(reads)
                written = requant_output_words(wide, ins, out_stride, state.out)
                writes.append((after_requant, _highest(written, dst)))
            elif op is Opcode.FILL:
                writes.append((after_requant, _highest(fill_words(ins), dst)))
    later = np.minimum.accumulate([*reads, _NONE][::-1])[::-1]   # least read from j on
    gap = 0
    for first_matmul, highest in writes:
        if highest >= 0:
            gap = max(gap, highest - int(later[first_matmul]) + 1)
    return gap


def _highest(words: np.ndarray, dst: FeatureMap) -> int:
    """The highest offset into ``dst`` among ``words`` (−1 if none is in it)."""
    words = np.asarray(words).ravel()
    inside = words[(words >= dst.base) & (words < dst.end)]
    return int(inside.max()) - dst.base if inside.size else -1


def in_place_conflict(config: NpuConfig, instructions: list[Instruction], layer: range,
                      src: FeatureMap, dst: FeatureMap) -> str | None:
    """Check a placed program: the instructions ``layer`` (indices into ``instructions``,
    which run from a start) write ``dst`` over ``src``; what the first write of a word
    that a MATMUL of the layer may still read from ``src`` is, or None if there is none."""
    state, out_stride = GemmState(config.rows), 0
    reads: list[tuple[int, np.ndarray]] = []        # (instruction, src words read)
    writes: list[tuple[int, int, np.ndarray]] = []  # (instruction, first read, words)
    after_requant = 0
    for index, instruction in enumerate(instructions):
        mine = index in layer
        for ins in state.expand(instruction):
            op = ins.opcode
            if op is Opcode.SETREQ:
                out_stride = ins["out_stride"]
            if not mine:
                continue
            if op is Opcode.MATMUL:
                words = ins["act_addr"] + state.window.offsets(ins["count"])
                reads.append((index, words[(words >= src.base) & (words < src.end)]))
            elif op is Opcode.REQUANT:
                after_requant = len(reads)
                words = requant_output_words(config, ins, out_stride, state.out).ravel()
                writes.append((index, after_requant, words))
            elif op is Opcode.FILL:
                writes.append((index, after_requant, fill_words(ins)))
    for at, first_read, words in writes:
        written = set(words[(words >= src.base) & (words < src.end)].tolist())
        for read_at, read in reads[first_read:]:
            clash = written.intersection(read.tolist())
            if clash:
                return (f"instruction {at} ({instructions[at].opcode.name}) writes word "
                        f"{min(clash)}, which the MATMUL of instruction {read_at} still "
                        f"reads")
    return None
