"""The weight-stationary systolic array with its input skew and output deskew."""

from amaranth import Module, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig
from ..timing import ARRAY_INPUT_STAGES, array_latency
from .dsp import dsp_rows, paired_columns, registered_products
from .implementation import GENERIC, Implementation, check_implementation
from .line_buffer import LineBuffer
from .pe import ProcessingElement

__all__ = ["SystolicArray", "psum_width"]


def _delay(m: Module, value, cycles: int, name: str):
    """``value`` delayed by ``cycles`` reset-less registers (0: the value itself): the
    array's skew and deskew carry data, as its PEs do (hw/pe.py)."""
    return _delay_stages(m, value, cycles, name)[-1]


def _delay_stages(m: Module, value, cycles: int, name: str) -> list:
    """``value`` and each of its ``cycles`` reset-less delays (:func:`_delay`'s stages)."""
    stages = [value]
    for i in range(cycles):
        stage = Signal.like(value, name=f"{name}_d{i + 1}", reset_less=True)
        m.d.sync += stage.eq(stages[-1])
        stages.append(stage)
    return stages


def psum_width(config: NpuConfig, products: int) -> int:
    """Bits that hold a sum of ``products`` products exactly (or the accumulator width, if
    fewer: the accumulators wrap anyway, and a sum wrapped first wraps to the same value).
    A column's sum after row r has r + 1 products, so the partial sums, their adders and
    the deskew registers are only as wide as the rows above them need (int8, 2 rows: 17
    bits, 8 rows: 19, instead of 32)."""
    most = products << (config.input_width + config.weight_width - 2)  # |a·b| <= 2**(a+b-2)
    return min(config.accumulator_width, most.bit_length() + 1)


class SystolicArray(wiring.Component):
    """``rows`` × ``cols`` PEs. An activation word (one input per row) enters per cycle
    into a register; row r sees it r cycles after that (skew). Column c's sum leaves the
    bottom and is delayed ``cols - 1 - c`` cycles (deskew), so a whole result row appears
    at once, ``latency`` cycles after its activation word, sign-extended from the width
    the column's sums can reach (``psum_width``) to the accumulators'.

    ``weight_row`` with ``load`` shifts one row of weights into the top of bank
    ``load_bank``; ``rows`` such cycles load a tile (last row first). Column c shifts
    c cycles later (``load_skew``), as the words reach it c cycles later, so a word
    entering in cycle t uses in row r the bank as the loads up to cycle t + r left it, in
    every column: a bank may be loaded again right behind the last word through its
    bottom row, not its last column (``weight_use_cycles``, sw/timing.py). Without the
    skew every column shifts at once, and the load waits for the last column.

    With ``weight_segments`` S the columns shift in S segments of L = rows / S rows, each
    from its own input at its top row (``segment_row``, ``segment_load``,
    ``segment_load_bank`` for segments 1 to S − 1; the weight loader gives segment s its
    rows s·L cycles after segment 0's), so a tile loads in L cycles.

    With one weight bank (``weight_banks`` 1) a load writes each word straight into its
    row, ``load_index`` (``rows − 1 − k`` for the tile's k-th word: where the shift would
    leave it), with no shift down the column; on iCE40, where the array's rows pair their
    products in SB_MAC16s and take no load skew, the weight registers are the blocks' B
    input registers.

    With ``row_broadcast`` each row's skewed input reaches every column in the same cycle
    (the PEs' ``act_out`` go unused), so there is no deskew and no load skew, and the
    latency is that of one column.

    ``implementation``: whose DSP blocks multiply, and how many rows they take (hw/dsp.py).

    The depthwise mode (``line_buffer_depth``; words issued with ``depthwise`` high):
    lane c of each word also enters the top of column c (with row c's skew, so the
    deskew still lines the columns up; with ``row_broadcast``, with row 0's) and moves
    down the column at half the partial sums' speed, so row r multiplies the word r
    before the one whose sum it adds to. Row groups of three (kernel taps) are joined by
    line buffers (``line_buffer.py``) that hold the chain back ``line_delay`` more
    cycles, so group g sees the word g·(line_delay + 3) before: a window of the input
    map with the row pitch line_delay + 3. Rows past the groups see zeros. golden.py's
    ``_depthwise_products`` is the reference.

    With ``depthwise_tap_row`` (5 or 8 rows) one more row of PEs below the array
    completes the last group. Its activations are zero but for the column chains (so it
    adds nothing to other words' sums), and it loads a cycle after the row above, from
    that row's outgoing weight: after a LOADW it holds the bank's previous tile's row
    rows − L (SETGEMM ``tap_row`` loads a tile for it first).
    """

    def __init__(self, config: NpuConfig, *, implementation: Implementation = GENERIC):
        self._config = c = config
        self._implementation = check_implementation(implementation)
        super().__init__({
            "act": In(data.ArrayLayout(signed(c.input_width), c.rows)),
            "bank": In(1),
            "weight_row": In(data.ArrayLayout(signed(c.weight_width), c.cols)),
            "load": In(1),
            "load_bank": In(1),
            **({"load_index": In(range(c.rows))} if c.weight_banks == 1 else {}),
            **({"segment_row": In(data.ArrayLayout(
                    data.ArrayLayout(signed(c.weight_width), c.cols), c.weight_segments - 1)),
                "segment_load": In(c.weight_segments - 1),
                "segment_load_bank": In(c.weight_segments - 1)}
               if c.weight_segments > 1 else {}),
            "result": Out(data.ArrayLayout(signed(c.accumulator_width), c.cols)),
            **({"depthwise": In(1), "line_delay": In(range(c.line_buffer_depth))}
               if c.line_buffer_depth else {}),
        })

    @property
    def latency(self) -> int:
        return array_latency(self._config.array_rows, self._config.skew_cols)

    def elaborate(self, platform):
        c, implementation = self._config, self._implementation
        m = Module()
        # Where a DSP block holds two products (iCE40), neighbouring PEs of a row share
        # one: columns 2k and 2k + 1 (an odd last column multiplies alone).
        # Rows past the implementation's DSP budget multiply in logic (hw/dsp.py, dsp_rows).
        paired_cols = paired_columns(implementation, c.cols, c.input_width, c.weight_width)
        in_dsp = dsp_rows(implementation, c.rows, c.cols)
        depthwise = bool(c.line_buffer_depth)
        one_bank = c.weight_banks == 1
        # One bank, every product in a pair, no load skew: the weights in the SB_MAC16s.
        weights_in_dsp = (one_bank and not c.load_skew and paired_cols == c.cols
                          and in_dsp == c.rows)
        # The depthwise tap row (depthwise_tap_row), row `rows`, multiplies in logic.
        pes = [[ProcessingElement(input_width=c.input_width, weight_width=c.weight_width,
                                  psum_width=psum_width(c, r + 1),
                                  shared_multiplier=r < in_dsp and col < paired_cols,
                                  fabric_multiplier=r >= in_dsp, depthwise=depthwise,
                                  banks=c.weight_banks, weight_in_multiplier=weights_in_dsp,
                                  implementation=implementation)
                for col in range(c.cols)] for r in range(c.array_rows)]
        # The load skew: each column's weights, load and bank (with one bank, the row
        # index) a cycle after its left neighbour's (also one register for all the PEs of
        # a column). Without it (load_skew false) every column takes the load in the same
        # cycle.
        skew = [col if c.load_skew else 0 for col in range(c.cols)]
        column_load = [(_delay(m, self.weight_row[col], skew[col], f"load_skew{col}"),
                        _delay(m, self.load, skew[col], f"load_skew_valid{col}"),
                        _delay(m, self.load_bank, skew[col], f"load_skew_bank{col}"),
                        _delay(m, self.load_index, skew[col], f"load_skew_index{col}")
                        if one_bank else None)
                       for col in range(c.cols)]
        # With weight_segments, segment s (rows s·L to s·L + L − 1) takes its own words,
        # loads and bank bits at its top row, with the same column skew.
        loads_by_segment = [column_load] + [
            [(_delay(m, self.segment_row[s - 1][col], skew[col], f"load_skew{col}_s{s}"),
              _delay(m, self.segment_load[s - 1], skew[col], f"load_skew_valid{col}_s{s}"),
              _delay(m, self.segment_load_bank[s - 1], skew[col],
                     f"load_skew_bank{col}_s{s}"), None)
             for col in range(c.cols)]
            for s in range(1, c.weight_segments)]
        # Row r's inputs, r cycles after the word enters (skew); every stage is kept, for
        # the depthwise mode's column tops.
        skewed = [_delay_stages(m, self.act[r], r + ARRAY_INPUT_STAGES, f"skew{r}")
                  for r in range(c.rows)]
        for r in range(c.array_rows):
            tap_row = r == c.rows
            for col in range(c.cols):
                pe = pes[r][col]
                m.submodules[f"pe_{r}_{col}"] = pe
                if tap_row:
                    # The tap row shifts a cycle after the last segment's rows, as the words
                    # reach it a cycle after the row above: it takes that row's weight as the
                    # load shifts it out, so a LOADW leaves it the bank's previous tile's.
                    _, load, load_bank, _ = loads_by_segment[-1][col]
                    above = pes[r - 1][col]
                    m.d.comb += [
                        pe.load.eq(_delay(m, load, 1, f"tap_load{col}")),
                        pe.load_bank.eq(_delay(m, load_bank, 1, f"tap_load_bank{col}")),
                        pe.weight_in.eq(_delay(m, above.weight_out, 1, f"tap_weight{col}")),
                        pe.psum_in.eq(above.psum_out), pe.act_in.eq(0)]
                    if col == 0:
                        skew = r + ARRAY_INPUT_STAGES
                        m.d.comb += [
                            pe.bank_in.eq(_delay(m, self.bank, skew, f"skew_bank{r}")),
                            pe.mode_in.eq(_delay(m, self.depthwise, skew, f"skew_mode{r}"))]
                    else:
                        left = pes[r][col - 1]
                        m.d.comb += [pe.bank_in.eq(left.bank_out), pe.mode_in.eq(left.mode_out)]
                    continue
                weight_row, load, load_bank, load_index = loads_by_segment[r // c.load_rows][col]
                if one_bank:   # the word goes straight to its row
                    load = load & (load_index == r)
                m.d.comb += [pe.load.eq(load), pe.load_bank.eq(load_bank)]
                if col == 0:
                    skew = r + ARRAY_INPUT_STAGES
                    m.d.comb += [
                        pe.act_in.eq(skewed[r][-1]),
                        pe.bank_in.eq(_delay(m, self.bank, skew, f"skew_bank{r}")),
                    ]
                    if depthwise:
                        m.d.comb += pe.mode_in.eq(
                            _delay(m, self.depthwise, skew, f"skew_mode{r}"))
                elif c.row_broadcast:  # the row's first PE's inputs, in the same cycle
                    first = pes[r][0]
                    m.d.comb += [pe.act_in.eq(first.act_in), pe.bank_in.eq(first.bank_in)]
                    if depthwise:
                        m.d.comb += pe.mode_in.eq(first.mode_in)
                else:
                    left = pes[r][col - 1]
                    m.d.comb += [pe.act_in.eq(left.act_out), pe.bank_in.eq(left.bank_out)]
                    if depthwise:
                        m.d.comb += pe.mode_in.eq(left.mode_out)
                if r == 0:
                    m.d.comb += [pe.psum_in.eq(0), pe.weight_in.eq(weight_row)]
                else:
                    above = pes[r - 1][col]
                    segment_top = r % c.load_rows == 0
                    m.d.comb += [pe.psum_in.eq(above.psum_out),
                                 pe.weight_in.eq(weight_row if one_bank or segment_top
                                                 else above.weight_out)]
            if paired_cols and r < in_dsp:
                shared = pes[r][:paired_cols]
                products = registered_products(
                    m, implementation, [(pe.mul_act, pe.mul_weight) for pe in shared],
                    name=f"product_{r}",
                    # Both PEs of a pair load in the same cycle (no load skew).
                    b_loads=[pe.mul_load for pe in shared[::2]] if weights_in_dsp else None)
                m.d.comb += [pe.product.eq(p) for pe, p in zip(shared, products, strict=True)]
        if depthwise:
            self._column_chains(m, pes, skewed)
        for col in range(c.cols):
            bottom = pes[c.array_rows - 1][col].psum_out
            deskew = 0 if c.row_broadcast else c.cols - 1 - col
            m.d.comb += self.result[col].eq(_delay(m, bottom, deskew, f"deskew{col}"))
        return m

    def _column_chains(self, m: Module, pes, skewed) -> None:
        """The depthwise mode's activations down the columns: column c's top takes row
        c's skewed input (rows == cols); each group of three rows after the first takes
        the previous row's chain through a line buffer."""
        c = self._config
        groups = c.depthwise_groups
        for col in range(c.cols):
            # Lane c as row c's input (skewed c cycles, as column c's words are), or with
            # row_broadcast as row 0's (every column's words in the same cycle).
            top = skewed[col][ARRAY_INPUT_STAGES] if c.row_broadcast else skewed[col][-1]
            m.d.comb += pes[0][col].chain_in.eq(top)
        for g in range(1, groups):
            line = LineBuffer(c)
            m.submodules[f"line_buffer{g}"] = line
            m.d.comb += line.delay.eq(self.line_delay)
            for col in range(c.cols):
                m.d.comb += [line.line_in[col].eq(pes[3 * g - 1][col].chain_in),
                             pes[3 * g][col].chain_in.eq(line.line_out[col])]
        for r in range(1, c.array_rows):
            if r % 3 or r >= 3 * groups:
                for col in range(c.cols):
                    m.d.comb += pes[r][col].chain_in.eq(
                        pes[r - 1][col].chain_out if r < 3 * groups else 0)
