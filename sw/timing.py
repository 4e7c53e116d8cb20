"""The NPU's pipeline depths and the issue timing they give, defined once.

The gateware (``npugen.hw``) builds its pipelines to these depths, the cycle model
(:class:`npugen.golden.CycleModel`) counts with them, and the timing section of
``docs/ARCHITECTURE.md`` is generated from them:
``python -m npugen.timing docs/ARCHITECTURE.md`` rewrites it; a test checks that it is
current. No Amaranth here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "REQUANT_PIPELINE_STAGES", "PRODUCT_PIPELINE_STAGES", "ARRAY_INPUT_STAGES",
    "REQUANT_INPUT_STAGES", "WEIGHT_LOAD_STAGES", "REQUANT_TAIL_CYCLES",
    "REQUANT_TO_ACC_TAIL_CYCLES", "FILL_TAIL_CYCLES", "RESCALE_TAIL_CYCLES",
    "TABLE_TAIL_CYCLES", "SERIAL_SHIFT_STEP",
    "SERIAL_SHIFT_CYCLES", "requant_shift_cycles",
    "array_latency", "requant_product_cycles", "requant_lane_latency",
    "requant_cycles", "weight_use_cycles", "weight_load_cycles", "load_next_cycles",
    "results_written_cycles", "requant_waits_for_feed", "timing_markdown", "splice_timing",
]

#: Registers in each requantization lane (hw/requant.py builds exactly this many).
REQUANT_PIPELINE_STAGES = 7
#: Registers between a PE's multiplier and its adder (they let the multiply and the
#: accumulate each take a whole clock period on the FPGA).
PRODUCT_PIPELINE_STAGES = 1
#: Registers on the array's activation input (the memory's output goes no further).
ARRAY_INPUT_STAGES = 1
#: Cycles from a LOADW's dispatch to its first shift into the array: the cycle after the
#: dispatch reads the weight memory, the next shifts the word in.
WEIGHT_LOAD_STAGES = 2
#: Registers between the accumulator memory's output and a requantization lane.
REQUANT_INPUT_STAGES = 1
#: Cycles from a REQUANT's start (its dispatch, unless it waits beside the feeder:
#: ``requant_waits_for_feed``) to the cycle the next instruction may dispatch,
#: beyond one cycle per channel group: issue, memory read, the input register, then the
#: lane's pipeline.
REQUANT_TAIL_CYCLES = 2 + REQUANT_INPUT_STAGES + REQUANT_PIPELINE_STAGES
#: The same for REQUANT to_acc, counted from its last source read instead of from one
#: cycle per group (the reads are every cycle with ``requant_overlap``, else every other
#: cycle: the last ``2·groups − 1`` cycles after the first): each word's results then
#: take the accumulate path (the destination is read in the cycle they leave the lanes;
#: add, write).
REQUANT_TO_ACC_TAIL_CYCLES = REQUANT_TAIL_CYCLES + 2
#: Cycles from a FILL's dispatch to the cycle the next instruction that waits for it may
#: dispatch, beyond one cycle per word (its writes start the cycle after the dispatch).
FILL_TAIL_CYCLES = 1
#: Cycles from a RESCALE's dispatch to the cycle the next instruction may dispatch,
#: beyond one cycle per word: each word's read (from the cycle after the dispatch), its
#: table lookup, the entries' register, then the accumulate path (the destination read
#: beside the register; add, write), the next instruction dispatching in the cycle of the
#: last write.
RESCALE_TAIL_CYCLES = 4
#: Cycles from a TABLE's start to the cycle the next instruction that waits for it may
#: dispatch, beyond one cycle per entry written (``NpuConfig.table_load_cycles``): the
#: parameter read, the entry selected into a register, then the writes, the last of them
#: in the cycle before.
TABLE_TAIL_CYCLES = 3


def requant_product_cycles(accumulator_width: int, serial_bits: int) -> int:
    """Cycles a requantizer lane takes per sample: 1 with its product in DSP blocks
    (``serial_bits`` 0), else one per ``serial_bits`` bits of the accumulator
    (``NpuConfig.requant_serial_bits``)."""
    return -(-accumulator_width // serial_bits) if serial_bits else 1


#: A serial requantizer's rounding shift by s (0 to 31) in place, 5 bits or 1 a cycle,
#: takes floor(s / 5) + s mod 5 cycles, at most this many (s = 29).
SERIAL_SHIFT_STEP = 5
SERIAL_SHIFT_CYCLES = 9


def requant_shift_cycles(product_cycles: int) -> int:
    """Cycles a requantizer lane's rounding shift takes: 1 (a barrel shifter, its own
    stage), or ``SERIAL_SHIFT_CYCLES`` in place where a serial product leaves the lane
    more than that between samples (``product_cycles``): the shift then needs no barrel
    shifter."""
    return SERIAL_SHIFT_CYCLES if product_cycles > SERIAL_SHIFT_CYCLES else 1


def requant_lane_latency(product_cycles: int) -> int:
    """Registers from a requantizer lane's input to its output: ``REQUANT_PIPELINE_STAGES``
    with the product in DSP blocks (two of them the product's); a serial product sums
    its first terms the cycle after the input register, takes its ``product_cycles``
    steps after that, and is ready the cycle after, and its rounding shift
    ``requant_shift_cycles`` in place of the one stage."""
    if product_cycles == 1:
        return REQUANT_PIPELINE_STAGES
    return (REQUANT_PIPELINE_STAGES - 1 + product_cycles
            + requant_shift_cycles(product_cycles) - 1)


def requant_cycles(groups: int, product_cycles: int = 1) -> int:
    """Cycles from a REQUANT's start to the first in which the next instruction may
    dispatch: it reads a group every ``product_cycles`` cycles from the cycle after its
    start, and the last one's results leave the lanes ``requant_lane_latency`` later
    (``REQUANT_TAIL_CYCLES`` counts the issue, the memory read, the input register and
    the parallel lane's pipeline)."""
    return ((groups - 1) * product_cycles + 1 + REQUANT_TAIL_CYCLES
            + requant_lane_latency(product_cycles) - REQUANT_PIPELINE_STAGES)


def array_latency(rows: int, cols: int) -> int:
    """Cycles from an activation word entering the array to its whole result row
    (``cols``: the columns a word passes one a cycle, ``NpuConfig.skew_cols``)."""
    return rows + cols - 1 + PRODUCT_PIPELINE_STAGES + ARRAY_INPUT_STAGES


def weight_use_cycles(rows: int, cols: int, load_skew: bool = True) -> int:
    """Cycles from a word's issue to the first in which a LOADW of its bank may dispatch.

    A word reaches row r, r cycles after row 0, and column c, c cycles after column 0.
    With the load skew (``NpuConfig.load_skew``) a load reaches column c c cycles after
    column 0 too (hw/array.py), so only the rows count: the load's first shift comes the
    cycle after the word has passed the bottom row's weights. Without it the load shifts
    every column at once, after the word has passed the last column's bottom PE."""
    return rows + ARRAY_INPUT_STAGES - WEIGHT_LOAD_STAGES + (0 if load_skew else cols - 1)


def _unskewed_weight_use_cycles(rows: int, cols: int) -> int:
    return weight_use_cycles(rows, cols, load_skew=False)


def weight_load_cycles(rows: int, cols: int) -> int:
    """Cycles from a LOADW's dispatch to the first in which a MATMUL on its bank may
    dispatch: the MATMUL's first word, issued the cycle after and entering the array the
    cycle after that, reaches the top row just behind the load's last shift."""
    return rows + WEIGHT_LOAD_STAGES - ARRAY_INPUT_STAGES - 2


def load_next_cycles(rows: int, cols: int) -> int:
    """Cycles from a LOADW's dispatch to the first in which the next LOADW may dispatch:
    the loader reads the next tile's first word the cycle after this tile's last."""
    return rows


def results_written_cycles(rows: int, cols: int) -> int:
    """Cycles from the issue of a MATMUL's last row to the first cycle in which every
    result is written to the accumulators (REQUANT and HALT wait for it): the row's
    array latency, then the accumulate path (read, add, write)."""
    return array_latency(rows, cols) + 3


def requant_waits_for_feed(requant_overlap: bool, to_acc: bool) -> bool:
    """Whether a REQUANT waits to dispatch until the feeder is idle and every result is
    written. On an NPU generated with ``requant_overlap`` one that does not go ``to_acc``
    dispatches beside the stream instead, and starts reading when the rows issued before
    it are written (``results_written_cycles`` after the last), so the MATMULs after it
    stream meanwhile. ``to_acc`` takes the accumulate path, which the stream's rows use."""
    return not requant_overlap or to_acc


def _formula(cycles: Callable[[int, int], int]) -> str:
    """A timing function of (rows, cols) as its formula, e.g. ``rows+cols+4``."""
    constant = cycles(0, 0)
    per_row, per_col = cycles(1, 0) - constant, cycles(0, 1) - constant
    if cycles(5, 3) != constant + 5 * per_row + 3 * per_col:
        raise ValueError(f"{cycles.__name__} is not linear in rows and cols")
    terms = [name if factor == 1 else f"{factor}·{name}"
             for factor, name in ((per_row, "rows"), (per_col, "cols")) if factor]
    if constant or not terms:
        terms.append(str(constant))
    return "+".join(terms).replace("+-", "−")


BEGIN = "<!-- timing:begin -->"
END = "<!-- timing:end -->"


def timing_markdown() -> str:
    """The timing section of ``docs/ARCHITECTURE.md`` (between its markers)."""
    from .isa import REQUANT_OVERLAPPERS

    lines = [
        "Generated from `sw/timing.py` by `python -m npugen.timing docs/ARCHITECTURE.md`; a "
        "test checks that it is current. On an NPU generated with `row_broadcast` (each "
        "row's activation reaches its columns in the same cycle) read `cols` as 1 in these "
        "formulas (`NpuConfig.skew_cols`); on one generated with `weight_segments` S read "
        "`rows` as rows / S in the LOADW and MATMUL rules (`NpuConfig.load_rows`: each "
        "column segment loads its rows from its own part of the weight memory, segment s "
        "s·rows/S cycles after segment 0, as the words reach its top row). With "
        "`paired_loads` (a segment per row and the load skew: `weight_use_cycles` is 0) a "
        "LOADW may also dispatch in the cycle the feeder issues its bank's last word, and "
        "a GEMM's next K tile's LOADW dispatches in the cycle of its MATMUL when the LOADW "
        "rule holds as the units stand before that MATMUL. On one generated with "
        "`depthwise_tap_row` read `rows` as rows + 1 in the array latency and the results' "
        "rules (`NpuConfig.array_rows`: the tap row loads a cycle after the row above, so "
        "the load rules stand).",
        "",
        "| instruction | waits until |",
        "|---|---|",
        "| LOADW bank b | the loader is idle or reads its last word (the last LOADW was "
        f"dispatched `{_formula(load_next_cycles)}` cycles before or earlier, "
        "`load_next_cycles`); no row using bank b is being issued; the last "
        "such row has passed the bottom row of PEs before the load's first shift "
        f"(`{_formula(weight_use_cycles)}` cycles after its issue, `weight_use_cycles`; the "
        f"shifts start {WEIGHT_LOAD_STAGES} cycles after the dispatch, `WEIGHT_LOAD_STAGES`, "
        "and reach column c c cycles later, as the rows do; on an NPU generated without "
        "`load_skew` every column shifts at once, so the row must have passed the last "
        f"column's bottom PE: `{_formula(_unskewed_weight_use_cycles)}` cycles) |",
        "| MATMUL bank b | the feeder issues its last row (or is idle); a LOADW of bank b "
        f"was dispatched `{_formula(weight_load_cycles)}` cycles before or earlier "
        "(`weight_load_cycles`: the first word reaches the top row just behind the load's "
        "last shift) |",
        "| REQUANT | the feeder is idle and every result is written "
        f"(`{_formula(results_written_cycles)}` cycles after the last row, "
        "`results_written_cycles`); on an NPU generated with `requant_overlap`, unless "
        "`to_acc`: nothing, and it starts when that holds for the rows issued before it "
        "(`requant_waits_for_feed`); then the next instruction waits one cycle per channel "
        f"group + {REQUANT_TAIL_CYCLES} from the REQUANT's start "
        f"(`REQUANT_TAIL_CYCLES`; with `to_acc`, {REQUANT_TO_ACC_TAIL_CYCLES} from its last "
        "source read, `REQUANT_TO_ACC_TAIL_CYCLES`: the reads take one cycle per group "
        "with `requant_overlap`, else every other cycle; on an NPU generated with "
        "`requant_serial_bits` k, a group every P = ceil(accumulator_width / k) cycles: "
        f"`groups·P + {requant_cycles(1, 2) - 2}` from its start, and past P = "
        f"{SERIAL_SHIFT_CYCLES} (the rounding shift in place) `groups·P + "
        f"{requant_cycles(1, SERIAL_SHIFT_CYCLES + 1) - SERIAL_SHIFT_CYCLES - 1}`, "
        "`requant_cycles`) |",
        "| FILL | nothing (on an NPU generated with `single_port_activations`: the feeder is "
        "idle); then the next instruction waits one cycle per word + "
        f"{FILL_TAIL_CYCLES} from the FILL's dispatch (`FILL_TAIL_CYCLES`) |",
        "| RESCALE | the feeder is idle and every result is written; then the next "
        f"instruction waits one cycle per word + {RESCALE_TAIL_CYCLES} from the RESCALE's "
        "dispatch (`RESCALE_TAIL_CYCLES`) |",
        "| RESCALE | also: no TABLE is in progress |",
        "| TABLE | no TABLE is in progress; it starts when no REQUANT or FILL is; then the "
        "next instruction that waits for it (as for a FILL, below; and RESCALE) waits one "
        f"cycle per entry of both tables + {TABLE_TAIL_CYCLES} from the TABLE's start "
        "(`TABLE_TAIL_CYCLES`, `NpuConfig.table_load_cycles`) |",
        "| SETKERN, SETWIN, SETOUT, SETGEMM, SETPP, SETREQ | nothing (one cycle) |",
        "| HALT | every unit is idle and every result is written |",
        "| every instruction | no RESCALE is in progress; no REQUANT, FILL or TABLE is "
        "in progress, but for "
        + ", ".join(op.name for op in REQUANT_OVERLAPPERS) + " after a FILL (unless "
        "`single_port_activations`), a TABLE (but RESCALE and TABLE) or a REQUANT "
        "with `overlap` on an NPU generated with `requant_overlap`: they dispatch beside "
        "it |",
        "",
        "| pipeline | cycles | name |",
        "|---|---|---|",
        f"| the array's activation input | {ARRAY_INPUT_STAGES} | `ARRAY_INPUT_STAGES` |",
        f"| a PE's product, before its adder | {PRODUCT_PIPELINE_STAGES} | "
        "`PRODUCT_PIPELINE_STAGES` |",
        "| the array, from a word's entry to its whole result row | "
        f"`{_formula(array_latency)}` | `array_latency` |",
        f"| the accumulator word, before the requantization lanes | {REQUANT_INPUT_STAGES} | "
        "`REQUANT_INPUT_STAGES` |",
        f"| a requantization lane | {REQUANT_PIPELINE_STAGES}; with a serial product of P "
        f"cycles, {requant_lane_latency(2) - 2}+P, and past P = {SERIAL_SHIFT_CYCLES} "
        f"(the rounding shift in place, {SERIAL_SHIFT_STEP} bits or 1 a cycle) "
        f"{requant_lane_latency(SERIAL_SHIFT_CYCLES + 1) - SERIAL_SHIFT_CYCLES - 1}+P | "
        "`REQUANT_PIPELINE_STAGES`, `requant_lane_latency`, `requant_shift_cycles` |",
    ]
    return "\n".join(lines)


def splice_timing(text: str) -> str:
    """``text`` (docs/ARCHITECTURE.md) with its timing section replaced by
    :func:`timing_markdown`; raises ``ValueError`` if the markers are missing."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"no timing section: the text needs {BEGIN} and then {END}")
    return f"{text[:begin]}{BEGIN}\n{timing_markdown()}\n{text[end:]}"


def main(argv: list[str]) -> int:
    """``python -m npugen.timing [ARCHITECTURE.md]``: rewrite the file's timing section,
    or print the section."""
    if not argv:
        print(timing_markdown())
        return 0
    path = Path(argv[0])
    try:
        path.write_text(splice_timing(path.read_text()))
    except (OSError, ValueError) as error:
        print(f"error: {path}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
