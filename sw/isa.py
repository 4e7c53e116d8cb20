"""The instruction set, defined once.

Every instruction is one 64-bit word: a 4-bit opcode in bits [0:4] and the fields of
that opcode at fixed offsets. The gateware decoder, the assembler and disassembler, the
golden model and ``docs/ISA.md`` all read the tables below.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ISA_VERSION", "INSTRUCTION_WIDTH", "OPCODE_WIDTH", "Opcode", "REQUANT_OVERLAPPERS",
    "Field", "FORMATS", "Instruction", "assemble", "disassemble", "encode_program",
    "decode_program", "isa_markdown",
]

#: Raised with every change to the instructions or to the identity block the host reads
#: (15: the NpuConfig field rescale_tables, TABLE and RESCALE), so that a host refuses a
#: bitstream or program of another version by name.
ISA_VERSION = 15
INSTRUCTION_WIDTH = 64
OPCODE_WIDTH = 4


class Opcode(enum.IntEnum):
    """The operations, by the code in bits [0:4] of an instruction word; what each does
    is in :data:`DESCRIPTIONS`, its fields in :data:`FORMATS`."""

    HALT = 0
    LOADW = 1
    MATMUL = 2
    REQUANT = 3
    SETPP = 4
    SETREQ = 5
    SETGEMM = 6
    GEMM = 7
    SETKERN = 8
    SETWIN = 9
    SETOUT = 10
    FILL = 11
    TABLE = 12
    RESCALE = 13


#: The instructions that may dispatch while a REQUANT with ``overlap`` runs: they use the
#: array, the weight loader, the rescale tables and the sequencer's walk registers, not
#: the requantizer.
REQUANT_OVERLAPPERS = (Opcode.LOADW, Opcode.MATMUL, Opcode.GEMM, Opcode.SETGEMM,
                       Opcode.SETKERN, Opcode.SETWIN, Opcode.RESCALE, Opcode.TABLE)


@dataclass(frozen=True)
class Field:
    """A field of an instruction word: bits [offset, offset + width), two's complement
    when ``signed``; ``doc`` is its meaning in docs/ISA.md. :attr:`low` and :attr:`high`
    are the least and greatest values it holds."""

    name: str
    offset: int
    width: int
    signed: bool = False
    doc: str = ""

    @property
    def low(self) -> int:
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def high(self) -> int:
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1


#: What each opcode does, for the docs and the disassembler's help.
DESCRIPTIONS: dict[Opcode, str] = {
    Opcode.HALT: "Wait until every unit is idle and every result is written, then stop.",
    Opcode.LOADW: (
        "Load one weight tile (`rows` words from `weight_addr` on) into weight bank "
        "`bank` of the array: it runs while a MATMUL on the other bank streams. Waits "
        "until the last activation using `bank` has passed the array's bottom row; the "
        "loads follow the words column by column (docs/ARCHITECTURE.md). On an NPU "
        "generated with `weight_segments` S, `weight_addr` is a multiple of `rows` and the "
        "tile loads in rows / S cycles."),
    Opcode.MATMUL: (
        "Stream `count` activation words through the array, using weight bank `bank`. "
        "Word i is read from `act_addr` + (i div L)·`row_step` + (i mod L)·`col_step`, "
        "with L, `row_step` and `col_step` from SETWIN (L = 0: `act_addr` + i·`col_step`). "
        "Result row i goes to accumulator word `acc_addr`+i (`acc_addr` itself when SETWIN "
        "set `reduce`) and is combined with it when `accumulate` is 1 (in reduce mode, "
        "also for every row after the first): added, or the larger kept lane by lane when "
        "`combine` is 1 (max); written over it otherwise. Issues one row a cycle; the "
        "next MATMUL may start while this one drains. In the depthwise mode (SETWIN "
        "`depthwise`, NPUs generated with line buffers) lane c of word i meets column c "
        "only: with G kernel-row groups (min(R div 3, 3), R the rows and the tap row of NPUs "
        "generated with depthwise_tap_row) and P = SETWIN's `pitch`, "
        "result row i − (G−1)·P − 2 (for i from (G−1)·P + 2 on; the words before only fill "
        "the line buffers) is, in column c, the sum over g < G and j < 3 of weight row "
        "3g + j (row `rows`: the tap row's weight, which a LOADW of the bank leaves from "
        "the tile before, its row rows − rows/S) times lane c of word i − g·P − j: a "
        "3-wide, G-high window whose last tap is word i. With SETWIN's `drop` D > 0, the "
        "results of the words i with (i − 2) mod P ≥ P − D (windows that wrap into the "
        "next row of the map) are dropped too, and the others go to consecutive "
        "accumulator words."),
    Opcode.REQUANT: (
        "Post-process `count` accumulator words from `acc_addr` on: + bias, "
        "requantize by the Q31 multiplier and the right shift, rounding twice (gemmlowp: "
        "rounding doubling high multiply, rounding right shift) or, with `single_rounding`, "
        "once (the exact product, rounded half up; an NPU generated with rounding 'double' "
        "or 'single' runs only that one), + zero point, clamp, saturate; write the `cols` "
        "results of accumulator word i to activation lanes `out_lane`, `out_lane`+1, ... of word "
        "`out_addr` + (i div L)·`row_step` + (i mod L), with L and `row_step` from SETOUT "
        "(L = 0: `out_addr`+i), moving to the next word block (+`out_stride`) past the last lane. "
        "With `to_acc`, the results before clamping (accumulator-wide) go instead to "
        "accumulator word `out_addr`+i, added to it when `accumulate` is 1, at one channel "
        "group every two cycles (every cycle on NPUs generated with requant_overlap), and "
        "with SETOUT's `from_map` the source words are activation words of a map (SETOUT); "
        "`left_shift` first multiplies acc + bias by 2^20 (TFLite's Add). Parameters "
        "come from SETREQ/SETPP. Reads only once the results of the rows "
        "issued before it are written (on NPUs generated with requant_overlap one without "
        "`to_acc` dispatches at once and starts then; else it waits to dispatch); blocks "
        "until done, but with `overlap` (NPUs generated with requant_overlap) only the "
        "instructions that use the requantizer or end the run wait: "
        + ", ".join(op.name for op in REQUANT_OVERLAPPERS) + " go on. The "
        "program must then keep those off its accumulator words and its output words "
        "until the next instruction that waits (the golden model refuses one that does "
        "not)."),
    Opcode.SETPP: "Set the post-processing zero point and clamp bounds used by REQUANT.",
    Opcode.SETREQ: (
        "Set the parameter-memory address of the first channel group and the "
        "output word stride used by REQUANT; with `param_walk`, each accumulator word of a "
        "REQUANT takes the next channel groups' parameters (word i from `param_addr` + "
        "i·cols/requant_lanes on): the output tiles of a one-pixel layer, one REQUANT for "
        "them all."),
    Opcode.SETGEMM: (
        "Set the weight pointer, the number of K tiles and the activation words between "
        "input-channel tiles, used by GEMM; with `tap_row` (NPUs generated with "
        "depthwise_tap_row) each K tile is two weight tiles."),
    Opcode.GEMM: (
        "One output tile of a GEMM or convolution: for kt = 0 .. k_tiles−1, LOADW into "
        "bank `bank` xor (kt mod 2) from the weight pointer + kt·rows, then MATMUL on that "
        "bank of `count` words into `acc_addr` (combining when `accumulate` is 1 or kt > 0), "
        "starting at `act_addr` + t·`tile_step` + y·`kernel_row_step` + x, where kt walks "
        "the kernel taps x = kt mod kernel_w, y = (kt div kernel_w) mod kernel_h, then the "
        "channel tiles t = kt div (kernel_w·kernel_h) (SETKERN; 1×1 after a start). Each "
        "step is dispatched like the instruction it stands for. Afterwards the weight "
        "pointer has advanced by k_tiles·rows. With SETGEMM's `tap_row`, K tile kt's "
        "weights are the two tiles from the weight pointer + 2·kt·rows: its LOADW is two, "
        "the second tile's then the first's, into the same bank (the first's rows for the "
        "array, the second's row rows − rows/S for the tap row), and the pointer advances "
        "by 2·k_tiles·rows."),
    Opcode.SETKERN: (
        "Set the kernel GEMM walks over (implicit im2col): taps per row, rows, and the "
        "activation words between kernel rows (the input's row pitch). A start sets 1×1."),
    Opcode.SETWIN: (
        "Set the activation walk of MATMUL (and of GEMM's steps): output pixels per row "
        "(0: one endless row), words between rows and between pixels (the stride), "
        "reduce mode, and the depthwise mode with its row pitch and the results it drops. A "
        "start sets 0, 0, 1, 0 and no depthwise mode: consecutive words."),
    Opcode.FILL: (
        "Write `value` to every lane of `count` activation words, word i at `out_addr` + "
        "(i div L)·`row_step` + (i mod L) (L = `row_length`; 0: `out_addr` + i), one word "
        "a cycle (feature-map NPUs: a map's halo, its padding value). It takes the "
        "requantizer's write port, so instructions wait for it as for a REQUANT, but it "
        "reads no accumulator and does not wait for the array, and "
        + ", ".join(op.name for op in REQUANT_OVERLAPPERS) + " dispatch beside it: the "
        "program must keep those off its words (the golden model refuses one that does "
        "not). On an NPU generated with `single_port_activations` it waits for the "
        "feeder's last read instead, and nothing dispatches beside it."),
    Opcode.SETOUT: (
        "Set where REQUANT writes: accumulator words per output row (0: one endless row) "
        "and the activation words between output rows; with `from_map`, where a REQUANT "
        "`to_acc` reads instead: activation word `acc_addr` + (i div L)·`row_step` + "
        "(i mod L), each lane sign-extended, for source word i (NPUs generated with "
        "requant_overlap on a square array with a requantizer lane per column). A start "
        "sets 0, 0, 0."),
    Opcode.TABLE: (
        "Load both rescale tables (NPUs generated with rescale_tables) from the parameter "
        "words `param_addr` on: entry k·requant_lanes + j of table t from lane j of word "
        "k, its bias field for table 0 and its multiplier field for table 1, each read as "
        "an accumulator-wide signed value; 2^input_width entries a table, one written a "
        "cycle. It takes the requantizer's parameter port: dispatched beside a REQUANT "
        "with `overlap` or a FILL, it starts when they are done; instructions wait for it "
        "as for a FILL, and LOADW, MATMUL, GEMM, SETGEMM, SETKERN and SETWIN dispatch "
        "beside it; RESCALE and TABLE wait for it."),
    Opcode.RESCALE: (
        "Look up `count` activation words in rescale table `table` (NPUs generated with "
        "rescale_tables, a square array): word i is read along SETWIN's walk, as "
        "MATMUL's (`act_addr` + (i div L)·`row_step` + (i mod L)·`col_step`; not in "
        "reduce or depthwise mode), and lane c's value x, as an unsigned index (x mod "
        "2^input_width), selects the entry that goes to column c of accumulator word "
        "`acc_addr` + i, added to it when `accumulate` is 1. One word a cycle, beside "
        "neither the array nor a REQUANT to_acc: it waits until the feeder is idle and "
        "every result is written, and blocks until its last word is written; it "
        "dispatches beside a REQUANT with `overlap` (the program must keep its words "
        "apart, as for MATMUL). An add's input rescale (TFLite's Add) is a function of "
        "the int8 input alone: a table of the rescaled values replaces a REQUANT to_acc "
        "pass."),
}

_A16 = 16
FORMATS: dict[Opcode, tuple[Field, ...]] = {
    Opcode.HALT: (),
    Opcode.LOADW: (
        Field("bank", 4, 1, doc="weight bank to load (0 or 1)"),
        Field("weight_addr", 8, _A16, doc="weight-buffer word of the tile's first row"),
    ),
    Opcode.MATMUL: (
        Field("bank", 4, 1, doc="weight bank to use"),
        Field("accumulate", 5, 1, doc="1: add to the accumulator; 0: overwrite"),
        Field("act_addr", 8, _A16, doc="first activation word"),
        Field("acc_addr", 24, _A16, doc="first accumulator word"),
        Field("count", 40, _A16, doc="activation words to stream (1 or more)"),
        Field("combine", 6, 1, doc="0: accumulate adds; 1: keeps the larger value (max; "
              "NPUs generated with max_pooling)"),
    ),
    Opcode.REQUANT: (
        Field("acc_addr", 8, _A16, doc="first accumulator word"),
        Field("out_addr", 24, _A16, doc="activation word of the first output row"),
        Field("count", 40, _A16, doc="accumulator words to process (1 or more)"),
        Field("out_lane", 56, 6, doc="activation lane of the first output channel"),
        Field("to_acc", 4, 1, doc="1: write the unclamped results to accumulator words (NPUs "
              "generated with adds)"),
        Field("accumulate", 5, 1, doc="with to_acc: add to the accumulator words"),
        Field("left_shift", 6, 1, doc="1: multiply acc + bias by 2^20 before rescaling (NPUs "
              "generated with adds)"),
        Field("single_rounding", 7, 1,
              doc="1: round the product once (TFLite's FULLY_CONNECTED, ONNX); "
                  "0: round twice (gemmlowp)"),
        Field("ties_to_even", 62, 1,
              doc="1: a value exactly halfway at the last rounding goes to the even result "
                  "(ONNX's QuantizeLinear), not up (single) or away from zero (double); "
                  "NPUs built with rounding 'double' only do not have it"),
        Field("overlap", 63, 1,
              doc="1: the instructions after it that do not use the requantizer may "
                  "dispatch while it runs (NPUs generated with requant_overlap; not with "
                  "to_acc)"),
    ),
    Opcode.SETPP: (
        Field("zero_point", 8, 16, signed=True, doc="output zero point"),
        Field("clamp_min", 24, 16, signed=True, doc="lowest output value (before saturation)"),
        Field("clamp_max", 40, 16, signed=True, doc="highest output value"),
    ),
    Opcode.SETREQ: (
        Field("param_addr", 8, _A16, doc="parameter word of the first channel group"),
        Field("out_stride", 24, _A16, doc="activation words between output lane blocks"),
        Field("param_walk", 40, 1, doc="1: accumulator word i's parameters from "
              "`param_addr` + i·cols/requant_lanes (0: every word from `param_addr`)"),
    ),
    Opcode.SETGEMM: (
        Field("weight_addr", 8, _A16, doc="weight pointer: first row of the first tile"),
        Field("k_tiles", 24, _A16, doc="weight tiles (of rows words) per GEMM, 1 or more"),
        Field("tile_step", 40, _A16, doc="activation words between input-channel tiles"),
        Field("tap_row", 56, 1, doc="1: each K tile loads a second tile first, for the "
              "depthwise tap row (NPUs generated with depthwise_tap_row)"),
    ),
    Opcode.GEMM: (
        Field("bank", 4, 1, doc="weight bank of the first K tile"),
        Field("accumulate", 5, 1, doc="1: add the first K tile to the accumulators too"),
        Field("act_addr", 8, _A16, doc="activation word of the first K tile"),
        Field("acc_addr", 24, _A16, doc="first accumulator word"),
        Field("count", 40, _A16, doc="activation words per K tile (1 or more)"),
        Field("combine", 6, 1, doc="0: accumulate adds; 1: keeps the larger value (max; "
              "NPUs generated with max_pooling)"),
    ),
    Opcode.SETKERN: (
        Field("kernel_w", 8, 8, doc="kernel taps per row (1 or more)"),
        Field("kernel_h", 16, 8, doc="kernel rows (1 or more)"),
        Field("kernel_row_step", 24, _A16, doc="activation words between kernel rows"),
    ),
    Opcode.SETWIN: (
        Field("row_length", 8, _A16, doc="words per row of the walk (0: one endless row)"),
        Field("row_step", 24, _A16, doc="activation words from one row's start to the next"),
        Field("col_step", 40, 8, doc="activation words between words of a row (stride)"),
        Field("reduce", 48, 1, doc="1: every row goes to accumulator word acc_addr"),
        Field("drop", 4, 4,
              doc="depthwise mode: the last results of every row of `pitch` words to drop "
                  "(the windows that wrap into the next row: pitch − output width), 0: none"),
        Field("depthwise", 49, 1,
              doc="1: the depthwise mode (kernel taps in the rows, channels in the columns)"),
        Field("pitch", 50, 14,
              doc="depthwise mode: words between the window's rows (the input's row pitch, "
                  "4 to line_buffer_depth)"),
    ),
    Opcode.FILL: (
        Field("value", 4, 8, signed=True, doc="the value written (the map's padding)"),
        Field("row_length", 12, 8, doc="words per row of the walk (0: one endless row)"),
        Field("out_addr", 20, _A16, doc="first activation word"),
        Field("count", 36, _A16, doc="words to write (1 or more)"),
        Field("row_step", 52, 12, doc="activation words from one row's start to the next"),
    ),
    Opcode.SETOUT: (
        Field("row_length", 8, _A16, doc="accumulator words per output row (0: one row)"),
        Field("row_step", 24, _A16, doc="activation words from one output row to the next"),
        Field("from_map", 40, 1,
              doc="1: a REQUANT to_acc reads its source from the activation words along "
                  "this walk (NPUs generated with requant_overlap on a square array with a "
                  "requantizer lane per column); "
                  "other REQUANTs need it 0"),
    ),
    Opcode.TABLE: (
        Field("param_addr", 8, _A16, doc="parameter word of the tables' first entries"),
    ),
    Opcode.RESCALE: (
        Field("table", 4, 1, doc="rescale table to look up (0 or 1)"),
        Field("accumulate", 5, 1, doc="1: add to the accumulator; 0: overwrite"),
        Field("act_addr", 8, _A16, doc="first activation word"),
        Field("acc_addr", 24, _A16, doc="first accumulator word"),
        Field("count", 40, _A16, doc="activation words to look up (1 or more)"),
    ),
}

OPCODE_FIELD = Field("opcode", 0, OPCODE_WIDTH, doc="operation")


def _check_formats() -> None:
    for opcode, fields in FORMATS.items():
        used = (1 << OPCODE_WIDTH) - 1
        for f in fields:
            mask = ((1 << f.width) - 1) << f.offset
            assert f.offset + f.width <= INSTRUCTION_WIDTH, (opcode, f)
            assert not used & mask, f"{opcode.name}.{f.name} overlaps another field"
            used |= mask


_check_formats()


@dataclass(frozen=True)
class Instruction:
    """One decoded instruction: an opcode and the values of its fields."""

    opcode: Opcode
    args: Mapping[str, int] = field(default_factory=dict)
    # A GEMM's step: the K tile it is of (-1: an instruction of its own). Not a field of
    # the encoding; the cycle model reads it (a K tile's LOADW may dispatch beside the
    # MATMUL before it, NpuConfig.paired_loads).
    k_tile: int = field(default=-1, compare=False, repr=False)

    def __post_init__(self) -> None:
        opcode = Opcode(self.opcode)
        object.__setattr__(self, "opcode", opcode)
        names = {f.name for f in FORMATS[opcode]}
        unknown = sorted(set(self.args) - names)
        if unknown:
            raise ValueError(
                f"{opcode.name} has no field {', '.join(unknown)}; "
                f"its fields: {', '.join(sorted(names)) or 'none'}")
        values = {}
        for f in FORMATS[opcode]:
            value = self.args.get(f.name, 0)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"{opcode.name}.{f.name} must be an integer, not {value!r}")
            value = int(value)
            if not f.low <= value <= f.high:
                raise ValueError(
                    f"{opcode.name}.{f.name} must be between {f.low} and {f.high}, "
                    f"not {value}")
            values[f.name] = value
        object.__setattr__(self, "args", values)

    def __getitem__(self, name: str) -> int:
        return self.args[name]

    def encode(self) -> int:
        word = int(self.opcode)
        for f in FORMATS[self.opcode]:
            word |= (self.args[f.name] & ((1 << f.width) - 1)) << f.offset
        return word

    @classmethod
    def decode(cls, word: int) -> Instruction:
        word = int(word)
        code = word & ((1 << OPCODE_WIDTH) - 1)
        try:
            opcode = Opcode(code)
        except ValueError:
            raise ValueError(f"unknown opcode {code} in instruction word {word:#018x}") from None
        args = {}
        for f in FORMATS[opcode]:
            value = (word >> f.offset) & ((1 << f.width) - 1)
            if f.signed and value >> (f.width - 1):
                value -= 1 << f.width
            args[f.name] = value
        return cls(opcode, args)

    def __str__(self) -> str:
        parts = [self.opcode.name]
        parts += [f"{f.name}={self.args[f.name]}" for f in FORMATS[self.opcode]]
        return " ".join(parts)


def encode_program(instructions: Iterable[Instruction]) -> np.ndarray:
    """Instructions as words of the instruction memory (uint64), in order. An
    :class:`Instruction` checks its values when it is made, so encoding does not fail."""
    return np.array([i.encode() for i in instructions], dtype=np.uint64)


def decode_program(words: Iterable[int]) -> list[Instruction]:
    """Instruction words as :class:`Instruction` objects; bits outside the opcode's fields
    are ignored. Raises ``ValueError`` naming the word for an unknown opcode."""
    return [Instruction.decode(int(w)) for w in words]


_LINE = re.compile(r"^\s*([A-Za-z]+)((?:\s+\w+\s*=\s*-?\w+)*)\s*$")
_ARG = re.compile(r"(\w+)\s*=\s*(-?\w+)")


def assemble(text: str) -> list[Instruction]:
    """Assemble text, one instruction a line: ``MATMUL bank=0 act_addr=4 count=16``.

    ``#`` starts a comment; fields left out are 0. Errors name the line.
    """
    program = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if not match:
            raise ValueError(f"line {number}: cannot parse {raw.strip()!r}")
        name = match.group(1).upper()
        if name not in Opcode.__members__:
            raise ValueError(
                f"line {number}: unknown instruction {match.group(1)!r}; "
                f"known: {', '.join(Opcode.__members__)}")
        args = {k: int(v, 0) for k, v in _ARG.findall(match.group(2))}
        try:
            program.append(Instruction(Opcode[name], args))
        except (TypeError, ValueError) as error:
            raise ValueError(f"line {number}: {error}") from None
    return program


def disassemble(words: Iterable[int]) -> str:
    """Instruction words as text that :func:`assemble` reads back, one instruction a line
    with every field written out; ``ValueError`` for an unknown opcode."""
    return "\n".join(str(i) for i in decode_program(words))


def isa_markdown() -> str:
    """``docs/ISA.md``, generated from the tables above."""
    lines = [
        "# npugen instruction set",
        "",
        f"ISA version {ISA_VERSION}. Generated from `sw/isa.py` by "
        "`python -m npugen.isa > docs/ISA.md`; a test checks that it is current.",
        "",
        f"Each instruction is one {INSTRUCTION_WIDTH}-bit word; the opcode is in bits "
        f"[0:{OPCODE_WIDTH}]. Fields left out are zero. Signed fields are two's complement.",
        "",
        "| opcode | name | summary |",
        "|---|---|---|",
    ]
    for opcode in Opcode:
        lines.append(f"| {int(opcode)} | `{opcode.name}` | {DESCRIPTIONS[opcode]} |")
    for opcode in Opcode:
        lines += ["", f"## {opcode.name} (opcode {int(opcode)})", "", DESCRIPTIONS[opcode], ""]
        if not FORMATS[opcode]:
            lines.append("No fields.")
            continue
        lines += ["| field | bits | signed | meaning |", "|---|---|---|---|"]
        for f in FORMATS[opcode]:
            bits = f"[{f.offset}:{f.offset + f.width}]"
            lines.append(f"| `{f.name}` | {bits} | {'yes' if f.signed else 'no'} | {f.doc} |")
    lines += [
        "",
        "## Assembly syntax",
        "",
        "One instruction a line, `NAME field=value ...`; `#` starts a comment. Example:",
        "",
        "```",
        "LOADW bank=0 weight_addr=0",
        "MATMUL bank=0 accumulate=0 act_addr=0 acc_addr=0 count=16",
        "HALT",
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(isa_markdown(), end="")
