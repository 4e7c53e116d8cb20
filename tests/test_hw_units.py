"""Unit tests of the gateware blocks in Amaranth's own simulator.

Each block is compared, whole result against whole result, with a Python reference: the
processing element and the systolic array with a few lines of NumPy, the requantizer with
:func:`npugen.arith.requantize`, and the whole NPU with the golden model.
"""

from __future__ import annotations

import numpy as np
import pytest
from amaranth.sim import Simulator

from npugen.arith import requantize, wrap
from npugen.config import ROUNDINGS, NpuConfig
from npugen.hostops import bus_program, decode_result, execute
from npugen.hw.array import SystolicArray
from npugen.hw.npu import Npu
from npugen.hw.pe import ProcessingElement
from npugen.hw.requant import Requantizer
from npugen.isa import Instruction, Opcode, encode_program
from npugen.job import Job, run_golden
from npugen.matmul import matmul_job, matmul_output
from npugen.memory_map import Reg, Region, Status, address, host_read_latency, identity_words
from npugen.sim.pysim import CLOCK_PERIOD_S, AmaranthBus

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def simulate(dut, testbench) -> None:
    """Run ``testbench`` against ``dut`` on the ``sync`` clock of sim/pysim.py (whose
    host-port driver times its waits by it) until it returns."""
    sim = Simulator(dut)
    sim.add_clock(CLOCK_PERIOD_S)
    sim.add_testbench(testbench)
    sim.run()


def as_list(value) -> list[int]:
    """A sampled ``ArrayLayout`` view as a list of ints."""
    return [value[i] for i in range(len(value))]


def signed_range(width: int) -> tuple[int, int]:
    return -(1 << (width - 1)), (1 << (width - 1)) - 1


# -- Processing element --------------------------------------------------------------------

PE_WIDTHS = {"input_width": 8, "weight_width": 8, "psum_width": 16}


def test_pe_banks_products_and_wraparound():
    """Both banks load, weight_out shows the load_bank bank, psum wraps at 16 bits, and
    loading one bank leaves the other alone."""
    pe = ProcessingElement(**PE_WIDTHS)
    seen = {}

    async def load(ctx, bank, weight):
        ctx.set(pe.load, 1)
        ctx.set(pe.load_bank, bank)
        ctx.set(pe.weight_in, weight)
        await ctx.tick()
        ctx.set(pe.load, 0)

    async def mac(ctx, act, bank, psum):
        # The product registers first; psum_in meets it one cycle later.
        ctx.set(pe.act_in, act)
        ctx.set(pe.bank_in, bank)
        ctx.set(pe.psum_in, 12345)  # added to the previous (zero) product, then discarded
        await ctx.tick()
        passed = ctx.get(pe.act_out), ctx.get(pe.bank_out)
        ctx.set(pe.act_in, 0)
        ctx.set(pe.psum_in, psum)
        await ctx.tick()
        return ctx.get(pe.psum_out), *passed

    def weight_out(ctx, bank):
        ctx.set(pe.load_bank, bank)
        return ctx.get(pe.weight_out)

    async def testbench(ctx):
        await load(ctx, 0, 127)
        await load(ctx, 1, -128)
        ctx.set(pe.weight_in, 55)  # not loaded: load is low
        seen["weights"] = (weight_out(ctx, 0), weight_out(ctx, 1))
        # -20000 + (-128 * 127) = -36256 wraps to 29280; 20000 + 16384 wraps to -29152.
        seen["bank0"] = await mac(ctx, -128, 0, -20000)
        seen["bank1"] = await mac(ctx, -128, 1, 20000)
        seen["unloaded"] = (weight_out(ctx, 0), weight_out(ctx, 1))
        await load(ctx, 1, 3)
        seen["after_bank1_reload"] = (weight_out(ctx, 0), weight_out(ctx, 1))
        seen["bank0_again"] = await mac(ctx, 100, 0, 32767)
        seen["bank1_new"] = await mac(ctx, -7, 1, -32768)
        await load(ctx, 0, -1)
        seen["after_bank0_reload"] = (weight_out(ctx, 0), weight_out(ctx, 1))
        seen["bank1_still"] = await mac(ctx, 5, 1, 0)

    simulate(pe, testbench)
    assert seen == {
        "weights": (127, -128),
        "bank0": (29280, -128, 0),
        "bank1": (-29152, -128, 1),
        "unloaded": (127, -128),
        "after_bank1_reload": (127, 3),
        "bank0_again": (int(wrap(32767 + 12700, 16)), 100, 0),
        "bank1_new": (int(wrap(-32768 - 21, 16)), -7, 1),
        "after_bank0_reload": (-1, 3),
        "bank1_still": (15, 5, 1),
    }


def test_pe_random_stream_matches_model():
    """Random inputs every cycle (loads included) against a reference with two weight
    registers and the product register."""
    rng = np.random.default_rng(1)
    pe = ProcessingElement(**PE_WIDTHS)
    cycles = 400
    lo8, hi8 = signed_range(8)
    lo16, hi16 = signed_range(16)
    stimulus = {
        "act_in": rng.integers(lo8, hi8 + 1, cycles),
        "bank_in": rng.integers(0, 2, cycles),
        "psum_in": rng.integers(lo16, hi16 + 1, cycles),
        "weight_in": rng.integers(lo8, hi8 + 1, cycles),
        "load": (rng.random(cycles) < 0.3).astype(int),
        "load_bank": rng.integers(0, 2, cycles),
    }
    got = []

    async def testbench(ctx):
        for t in range(cycles):
            for name, values in stimulus.items():
                ctx.set(getattr(pe, name), int(values[t]))
            weight_out = ctx.get(pe.weight_out)
            await ctx.tick()
            got.append((weight_out, ctx.get(pe.psum_out), ctx.get(pe.act_out),
                        ctx.get(pe.bank_out)))

    simulate(pe, testbench)
    expected, weights, product = [], [0, 0], 0
    for t in range(cycles):
        s = {name: int(values[t]) for name, values in stimulus.items()}
        psum = int(wrap(s["psum_in"] + product, 16))
        product = s["act_in"] * weights[s["bank_in"]]
        expected.append((weights[s["load_bank"]], psum, s["act_in"], s["bank_in"]))
        if s["load"]:
            weights[s["load_bank"]] = s["weight_in"]
    assert got == expected


# -- Systolic array --------------------------------------------------------------------------

ARRAY_CONFIGS = [
    NpuConfig(rows=2, cols=3, accumulator_width=32, activation_depth=16, weight_depth=16,
              accumulator_depth=16, instruction_depth=16, param_depth=16),
    NpuConfig(rows=3, cols=2, accumulator_width=16, activation_depth=16, weight_depth=16,
              accumulator_depth=16, instruction_depth=16, param_depth=16),
    NpuConfig(rows=1, cols=1, accumulator_width=16, activation_depth=16, weight_depth=16,
              accumulator_depth=16, instruction_depth=16, param_depth=16),
    # Without the load skew: every column shifts its weights in at once.
    NpuConfig(rows=2, cols=3, accumulator_width=32, activation_depth=16, weight_depth=16,
              accumulator_depth=16, instruction_depth=16, param_depth=16, load_skew=False),
    NpuConfig(rows=3, cols=2, accumulator_width=16, activation_depth=16, weight_depth=16,
              accumulator_depth=16, instruction_depth=16, param_depth=16, load_skew=False),
    # Each row's activation broadcast to its columns: no column skew at all.
    NpuConfig(rows=2, cols=3, accumulator_width=32, activation_depth=16, weight_depth=16,
              accumulator_depth=16, instruction_depth=16, param_depth=16, load_skew=False,
              row_broadcast=True),
    NpuConfig(rows=4, cols=4, accumulator_width=16, activation_depth=16, weight_depth=16,
              accumulator_depth=16, instruction_depth=16, param_depth=16, load_skew=False,
              row_broadcast=True, weight_banks=1),
]


def _array_id(config: NpuConfig) -> str:
    return (f"{config.rows}x{config.cols}"
            + ("-broadcast" if config.row_broadcast else "" if config.load_skew
               else "-unskewed") + ("-one-bank" if config.weight_banks == 1 else ""))


class ArraySchedule:
    """Per-cycle inputs of a :class:`SystolicArray` and the results they must give.

    Weight loads are modelled as the documented shift: each load cycle pushes a row into
    the top of a bank; with one bank, the tile's k-th word goes straight to row
    ``rows − 1 − k`` (``load_index``). With the load skew (hw/array.py), a word entering
    in cycle t uses in row r the bank as the loads up to cycle t + r left it, in every
    column: loads may follow a word through its bank row by row. Without it
    (``load_skew`` false), in row r and column c, as the loads up to cycle t + r + c left
    it; with ``row_broadcast``, in every column as the loads up to t + r left it.
    """

    def __init__(self, config: NpuConfig, rng: np.random.Generator):
        self.config = config
        self.rng = rng
        self.cycles: list[dict] = []

    def _cycle(self, t: int) -> dict:
        while len(self.cycles) <= t:
            self.cycles.append({"act": None, "bank": 0, "load_row": None, "load_bank": 0,
                                "load_index": 0})
        return self.cycles[t]

    def random_tile(self) -> np.ndarray:
        lo, hi = signed_range(self.config.weight_width)
        return self.rng.integers(lo, hi + 1, (self.config.rows, self.config.cols))

    def load(self, start: int, bank: int, tile: np.ndarray) -> int:
        """Shift ``tile`` into ``bank`` from cycle ``start`` on, last row first."""
        for i, row in enumerate(tile[::-1]):
            cycle = self._cycle(start + i)
            assert cycle["load_row"] is None
            cycle.update(load_row=row, load_bank=bank, load_index=len(tile) - 1 - i)
        return start + len(tile)

    def stream(self, start: int, banks, acts=None) -> int:
        """Activation words (random unless given) from cycle ``start`` on, one a cycle."""
        lo, hi = signed_range(self.config.input_width)
        if acts is None:
            acts = self.rng.integers(lo, hi + 1, (len(banks), self.config.rows))
        for i, (bank, act) in enumerate(zip(banks, acts, strict=True)):
            cycle = self._cycle(start + i)
            assert cycle["act"] is None
            cycle.update(act=np.asarray(act), bank=int(bank))
        return start + len(banks)

    def expected_results(self, latency: int) -> np.ndarray:
        """``result`` in every cycle: word t's act @ bank, ``latency`` cycles later, row r
        of the bank as the loads up to cycle t + r left it (t + r + c in column c without
        the load skew)."""
        c = self.config
        banks = np.zeros((2, c.rows, c.cols), dtype=np.int64)
        history = []   # the banks after each cycle's load
        for cycle in self.cycles:
            if cycle["load_row"] is None:
                pass
            elif c.weight_banks == 2:
                b = cycle["load_bank"]
                banks[b] = np.vstack([cycle["load_row"][None], banks[b][:-1]])
            else:   # one bank: every load goes to bank 0, straight into its row
                banks[0][cycle["load_index"]] = cycle["load_row"]
            history.append(banks.copy())
        results = np.zeros((len(self.cycles) + latency, c.cols), dtype=np.int64)
        self.wrapped = 0  # words whose exact result does not fit the accumulator
        for t, cycle in enumerate(self.cycles):
            if cycle["act"] is not None:
                late = np.arange(c.cols) * (not c.load_skew and not c.row_broadcast)
                tile = np.array([[history[min(t + r + late[col], len(history) - 1)]
                                  [cycle["bank"] % c.weight_banks][r][col]
                                  for col in range(c.cols)]
                                 for r in range(c.rows)])
                exact = cycle["act"] @ tile
                results[t + latency] = wrap(exact, c.accumulator_width)
                self.wrapped += int(np.any(results[t + latency] != exact))
        return results


def run_array(array: SystolicArray, schedule: ArraySchedule) -> np.ndarray:
    """Drive ``schedule`` into ``array``; return ``result`` in every cycle."""
    c = schedule.config
    total = len(schedule.cycles) + array.latency
    got = []

    async def testbench(ctx):
        for t in range(total):
            cycle = schedule.cycles[t] if t < len(schedule.cycles) else None
            act = cycle and cycle["act"]
            load_row = cycle and cycle["load_row"]
            ctx.set(array.act, [0] * c.rows if act is None else [int(v) for v in act])
            ctx.set(array.bank, cycle["bank"] if cycle else 0)
            ctx.set(array.load, int(load_row is not None))
            ctx.set(array.load_bank, cycle["load_bank"] if cycle else 0)
            if c.weight_banks == 1:
                ctx.set(array.load_index, cycle["load_index"] if cycle else 0)
            ctx.set(array.weight_row,
                    [0] * c.cols if load_row is None else [int(v) for v in load_row])
            got.append(as_list(ctx.get(array.result)))
            await ctx.tick()

    simulate(array, testbench)
    return np.array(got, dtype=np.int64)


@pytest.mark.parametrize("config", ARRAY_CONFIGS, ids=_array_id)
def test_array_result_rows_arrive_after_latency(config):
    """Each result row equals act @ W (wrapped) exactly ``latency`` cycles after its word,
    with idle gaps between bursts, on bank 0 and on bank 1."""
    rng = np.random.default_rng(2)
    array = SystolicArray(config)
    assert array.latency == config.rows + config.skew_cols + 1
    schedule = ArraySchedule(config, rng)
    lowest = signed_range(config.input_width)[0]
    extreme_tile = schedule.random_tile()
    extreme_tile[:, 0] = signed_range(config.weight_width)[0]
    t = schedule.load(0, 0, schedule.random_tile())
    t = schedule.load(t, 1, extreme_tile)
    t = schedule.stream(t, [0] * 5)
    t = schedule.stream(t + 3, [1] * 5)
    t = schedule.stream(t, [1, 0], [[lowest] * config.rows] * 2)  # (-128)·(-128)·rows
    schedule.stream(t + 1, rng.integers(0, 2, 16))
    expected = schedule.expected_results(array.latency)
    assert np.any(expected), "the reference must not be trivially zero"
    if config.accumulator_width == 16 and config.rows > 1:
        assert schedule.wrapped, "some results must wrap around"
    np.testing.assert_array_equal(run_array(array, schedule), expected)


@pytest.mark.parametrize("config", ARRAY_CONFIGS, ids=_array_id)
def test_array_loads_one_bank_while_streaming_the_other(config):
    """Loading bank 1 under a bank-0 stream (and bank 0 under a bank-1 stream) leaves the
    streaming bank's results unchanged; the new tile is used right after its last row."""
    rng = np.random.default_rng(3)
    array = SystolicArray(config)
    latency = array.latency
    schedule = ArraySchedule(config, rng)
    rows = config.rows
    t = schedule.load(0, 0, schedule.random_tile())
    # Bank 1 loads during the first `rows` words of a bank-0 stream.
    schedule.load(t, 1, schedule.random_tile())
    t = schedule.stream(t, [0] * (rows + 6))
    t = schedule.stream(t, rng.integers(0, 2, 10))
    # Let bank-0 words drain under a bank-1 stream, then reload bank 0 under it.
    t = schedule.stream(t, [1] * latency)
    schedule.load(t, 0, schedule.random_tile())
    t = schedule.stream(t, [1] * (rows + 4))
    schedule.stream(t, rng.integers(0, 2, 10))
    expected = schedule.expected_results(latency)
    np.testing.assert_array_equal(run_array(array, schedule), expected)


@pytest.mark.parametrize("config", ARRAY_CONFIGS, ids=_array_id)
def test_array_reloads_a_bank_right_behind_its_last_word(config):
    """A bank's load may start ``rows`` cycles after the last word using it entered (it
    has passed the bottom row; the columns do not count; without the load skew,
    ``rows + cols − 1``: it has passed the last column's), and a word may use a tile from
    the cycle of its last shift. A load started earlier reaches the last words' lower
    rows, and the array gives exactly what the skew says (row r sees the loads up to
    cycle t + r), in every column."""
    rng = np.random.default_rng(4)
    array = SystolicArray(config)
    schedule = ArraySchedule(config, rng)
    # The reload's wait in the array's own cycles (weight_use_cycles counts from the
    # sequencer's dispatch, which is WEIGHT_LOAD_STAGES − ARRAY_INPUT_STAGES apart).
    rows = config.rows + (0 if config.load_skew else config.skew_cols - 1)
    t = schedule.load(0, 0, schedule.random_tile())
    t = schedule.load(t, 1, schedule.random_tile())
    last = schedule.stream(t, [0] * 4) - 1
    t = schedule.load(last + rows, 0, schedule.random_tile())   # behind the last word
    t = schedule.stream(t - 1, [0] * 3)                          # from the last shift
    if rows > 1:   # one cycle early: the last word's bottom row sees the first shift
        t = schedule.load(t - 1 + rows - 1, 0, schedule.random_tile())
        schedule.stream(t - 1, [0, 1, 0])
    expected = schedule.expected_results(array.latency)
    np.testing.assert_array_equal(run_array(array, schedule), expected)


# -- Requantizer ------------------------------------------------------------------------------

REQUANT_FIELDS = ("acc", "bias", "multiplier", "shift", "zero_point", "clamp_min", "clamp_max")


def requant_edge_cases(accumulator_width: int) -> list[tuple[int, ...]]:
    """(acc, bias, multiplier, shift, zero_point, clamp_min, clamp_max) corner cases."""
    acc_lo, acc_hi = signed_range(accumulator_width)
    wide = (-32768, 32767)  # clamp wider than any output: saturation decides
    cases = []
    # Rounding ties of the right shift: multiplier ~1 keeps x, remainder exactly half.
    for shift in range(1, accumulator_width - 2):
        for k in (0, 1, 2, 5, -1, -2, -3, -6):
            x = k * (1 << shift) + (1 << (shift - 1))
            for value in (x, -x):
                if acc_lo <= value <= acc_hi:
                    cases.append((value, 0, INT32_MAX, shift, 0, *wide))
    # Rounding ties of the doubling high multiply: x * 2**30 / 2**31 = x / 2 with x odd.
    for x in (1, -1, 3, -3, 5, -5, 255, -255, acc_hi, acc_lo + 1):
        cases.append((x, 0, 1 << 30, 0, 0, *wide))
        cases.append((x, 0, -(1 << 30), 0, 0, *wide))
    # Zero points at the output range ends, shift 0 and 31, big multipliers.
    for acc in (0, 1, -1, 100, -100, acc_hi, acc_lo, acc_hi // 3, acc_lo // 3):
        for multiplier in (INT32_MAX, 1 << 30, INT32_MIN, -1, 1, 0, 1 << 29):
            for shift in (0, 1, 7, 30, 31):
                for zero_point in (-128, 127, 0):
                    cases.append((acc, 0, multiplier, shift, zero_point, *wide))
                    cases.append((acc, 0, multiplier, shift, zero_point, -128, 127))
    # The saturating corner (reachable only when the sum can be -2**31).
    if accumulator_width == 32:
        for shift in (0, 1, 31):
            for zero_point in (0, -128, 127):
                cases.append((INT32_MIN, 0, INT32_MIN, shift, zero_point, *wide))
        cases.append((INT32_MAX, 1, INT32_MIN, 0, 0, *wide))  # the bias wraps to -2**31
        cases.append((-(1 << 30), -(1 << 30), INT32_MIN, 3, 0, *wide))
    # Bias addition wrapping at the accumulator width, both ways.
    for acc, bias in ((acc_hi, 1), (acc_lo, -1), (acc_hi, acc_hi), (acc_lo, acc_lo),
                      (acc_hi - 5, 100), (acc_lo + 5, -100)):
        for shift in (0, 4):
            cases.append((acc, bias, INT32_MAX, shift, 0, *wide))
    # Clamp bounds inside the output range and on it; zero point pushing out of range.
    for acc in (-5000, -40, -3, 0, 3, 40, 5000):
        cases.append((acc, 0, INT32_MAX, 0, 0, -5, 7))
        cases.append((acc, 0, INT32_MAX, 2, 0, -8, 7))
        cases.append((acc, 0, INT32_MAX, 0, 32767, *wide))
        cases.append((acc, 0, INT32_MAX, 0, -32768, *wide))
        cases.append((acc, 0, INT32_MAX, 0, 5, 0, 0))
    # Values landing just below, on and just above each clamp bound.
    for low, high in ((-5, 7), (-100, 90), (-128, 127), (-8, 7)):
        for acc in (low - 1, low, low + 1, high - 1, high, high + 1):
            cases.append((acc, 0, INT32_MAX, 0, 0, low, high))
            cases.append((acc - 3, 0, INT32_MAX, 0, 3, low, high))
    # Bounds outside the output range, and inverted ones (np.clip gives clamp_max).
    for low, high in ((200, 300), (-300, -200), (7, -5), (300, 200), (-200, -300),
                      (50, -200), (200, -300), (-300, 300)):
        for acc in (-5000, -250, -129, -128, -6, 0, 6, 127, 128, 250, 5000):
            cases.append((acc, 0, INT32_MAX, 0, 0, low, high))
    # Products exactly halfway for single rounding (x·m = (2k + 1)·2**(30+s)), with odd and
    # even results on both sides of zero, and one step off the half (a bit below it set).
    for shift in range(5):
        # m = 2**30 halves x·2**-s, 2**29 quarters it: x = (2k + 1)·2**s or ·2**(s+1).
        for multiplier, unit in ((1 << 30, 1 << shift), (1 << 29, 1 << (shift + 1))):
            for k in (0, 1, 2, 3, 6, -1, -2, -3, -7):
                x = (2 * k + 1) * unit
                for value in (x, x + 1, x - 1):
                    cases.append((value, 0, multiplier, shift, 0, *wide))
    return cases


def requant_random_cases(rng: np.random.Generator, accumulator_width: int,
                         count: int) -> np.ndarray:
    """Random inputs: full-range acc and bias, random multiplier, shift and post-processing."""
    acc_lo, acc_hi = signed_range(accumulator_width)
    bounds = np.sort(rng.integers(-300, 300, (count, 2)), axis=1)
    wide = rng.random(count) < 0.5
    bounds[wide] = (-32768, 32767)
    multiplier = rng.integers(INT32_MIN, INT32_MAX + 1, count)
    # Half the multipliers in the usual Q31 range [2**30, 2**31), as quantize_multiplier makes.
    usual = rng.random(count) < 0.5
    multiplier[usual] = rng.integers(1 << 30, INT32_MAX + 1, usual.sum())
    # Accumulators of realistic size too, so small shifts do not always saturate.
    acc = rng.integers(acc_lo, acc_hi + 1, count)
    small = rng.random(count) < 0.5
    acc[small] = rng.integers(-5000, 5000, small.sum())
    return np.stack([
        acc,
        np.where(rng.random(count) < 0.5, 0, rng.integers(acc_lo, acc_hi + 1, count)),
        multiplier,
        rng.integers(0, 32, count),
        rng.integers(-200, 200, count),
        bounds[:, 0],
        bounds[:, 1],
    ], axis=1)


def run_requantizer(cases: np.ndarray, valid: np.ndarray, *, accumulator_width: int,
                    output_width: int, rounding: str = "double",
                    left_shift: np.ndarray | None = None,
                    single: np.ndarray | None = None,
                    even: np.ndarray | None = None,
                    three_products: bool | None = None,
                    serial_bits: int = 0) -> tuple[np.ndarray, list[int], Requantizer]:
    """Feed ``cases`` (rows of REQUANT_FIELDS) one every ``product_cycles`` cycles (one a
    cycle unless the product is serial), with ``left_shift``, ``single`` and ``even`` per
    case when given; return ``out`` and ``out_valid`` in every cycle, and the
    Requantizer. Between two cases the inputs hold garbage (the next case's values or
    random ones) and valid is low. The zero point and the clamps go in at the stage before
    last, as documented, so they are presented ``latency - 2`` cycles after the
    accumulator. ``three_products``: the Requantizer's
    (its product's datapath)."""
    rq = Requantizer(accumulator_width=accumulator_width, output_width=output_width,
                     rounding=rounding, three_products=three_products,
                     left_shift=not serial_bits, serial_bits=serial_bits)
    latency, interval = rq.latency, rq.product_cycles
    columns = {name: cases[:, i] for i, name in enumerate(REQUANT_FIELDS)}
    first_stage = REQUANT_FIELDS[:4]
    late_stages = {"zero_point": latency - 2, "clamp_min": latency - 2,
                   "clamp_max": latency - 2}
    n = len(cases)
    outs, out_valids = [], []
    noise = np.random.default_rng(n)

    async def testbench(ctx):
        for t in range(n * interval + latency + 1):
            outs.append(ctx.get(rq.out))
            out_valids.append(ctx.get(rq.out_valid))
            case, phase = divmod(t, interval)
            if case < n:
                for name in first_stage:
                    value = int(columns[name][case])
                    if phase:   # not a case's cycle: another value, valid low
                        value = int(columns[name][noise.integers(n)])
                    ctx.set(getattr(rq, name), value)
                if left_shift is not None:
                    ctx.set(rq.left_shift, int(left_shift[case]))
                if single is not None:
                    ctx.set(rq.single, int(single[case] ^ (phase > 0)))
                if even is not None:
                    ctx.set(rq.even, int(even[case] ^ (phase > 0)))
            ctx.set(rq.valid, int(valid[case]) if case < n and not phase else 0)
            for name, stage in late_stages.items():
                late_case, late_phase = divmod(t - stage, interval)
                if 0 <= late_case < n and not late_phase:
                    ctx.set(getattr(rq, name), int(columns[name][late_case]))
            await ctx.tick()

    simulate(rq, testbench)
    return np.array(outs, dtype=np.int64), out_valids, rq


def check_requantizer(cases: np.ndarray, *, accumulator_width: int, output_width: int,
                      valid: np.ndarray | None = None, rounding: str = "double",
                      left_shift: np.ndarray | None = None,
                      rng: np.random.Generator | None = None,
                      three_products: bool | None = None, serial_bits: int = 0) -> None:
    """The requantizer's outputs, ``latency`` cycles after each input, equal
    ``npugen.arith.requantize`` bit for bit; ``out_valid`` follows ``valid``. Built with
    ``both`` roundings, each case asks for one at random (``rng``); built with single
    rounding (or both), each case also takes halves to even or not at random."""
    n = len(cases)
    valid = np.ones(n, dtype=int) if valid is None else valid
    single = (rng.random(n) < 0.5).astype(np.int64) if rounding == "both" else None
    per_case = np.full(n, int(rounding == "single")) if single is None else single
    even = None
    if rounding != "double":
        rng = rng or np.random.default_rng(0)
        even = (rng.random(n) < 0.5).astype(np.int64)

    def reference(mode: str) -> np.ndarray:
        return requantize(*cases.T, accumulator_width=accumulator_width,
                          output_width=output_width, rounding=mode,
                          left_shift=0 if left_shift is None else left_shift)

    expected = np.where(per_case, reference("single"), reference("double"))
    if even is not None:
        expected = np.where(even, np.where(per_case, reference("single_even"),
                                           reference("double_even")), expected)
    outs, out_valids, rq = run_requantizer(
        cases, valid, accumulator_width=accumulator_width, output_width=output_width,
        rounding=rounding, left_shift=left_shift, single=single, even=even,
        three_products=three_products, serial_bits=serial_bits)
    latency, interval = rq.latency, rq.product_cycles
    at = latency + interval * np.arange(n)
    got = outs[at]
    mismatches = np.flatnonzero((got != expected) & (valid == 1))
    report = [f"{dict(zip(REQUANT_FIELDS, map(int, cases[i]), strict=True))}: "
              f"expected {int(expected[i])}, got {int(got[i])}" for i in mismatches[:5]]
    assert not len(mismatches), f"{len(mismatches)} mismatches, e.g.\n" + "\n".join(report)
    out_valids = np.array(out_valids)
    np.testing.assert_array_equal(out_valids[at], valid)
    others = np.ones(len(out_valids), dtype=bool)
    others[at] = False
    assert not out_valids[others].any(), "out_valid high between the cases' outputs"


@pytest.mark.parametrize(("accumulator_width", "output_width"),
                         [(32, 8), (16, 8), (32, 4), (16, 4)])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("three_products", [True, False])
def test_requantizer_matches_arith_bit_for_bit(accumulator_width, output_width, rounding,
                                               three_products):
    """Edge cases and random inputs, pipelined one a cycle, against ``arith.requantize``
    (both roundings: each case's chosen at random, so the two mix in the pipeline); the
    32 × 32 product from three products of 18-bit operands (Karatsuba: ECP5, the generic
    design) and from four of 16-bit halves (iCE40)."""
    rng = np.random.default_rng(4 + accumulator_width + output_width)
    cases = np.concatenate([
        np.array(requant_edge_cases(accumulator_width), dtype=np.int64),
        requant_random_cases(rng, accumulator_width, 1500),
    ])
    cases = cases[rng.permutation(len(cases))]
    valid = (rng.random(len(cases)) < 0.9).astype(int)
    check_requantizer(cases, accumulator_width=accumulator_width, output_width=output_width,
                      valid=valid, rounding=rounding, rng=rng, three_products=three_products)


@pytest.mark.parametrize(("accumulator_width", "serial_bits"),
                         [(32, 1), (32, 4), (32, 5), (16, 8), (24, 3), (24, 2), (20, 2)])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_serial_requantizer_matches_arith_bit_for_bit(accumulator_width, serial_bits,
                                                      rounding):
    """The product made in logic, ``serial_bits`` of the accumulator a cycle (whole digits
    and a last one that overhangs), one case every ``product_cycles`` cycles with other
    values on the inputs between them: bit-exact with ``arith.requantize``. Past
    ``SERIAL_SHIFT_CYCLES`` cycles a case (32 bits one a cycle, 24 and 20 two a cycle:
    the last just one cycle past) the rounding shift is made in place."""
    rng = np.random.default_rng(serial_bits + accumulator_width)
    cases = np.concatenate([
        np.array(requant_edge_cases(accumulator_width), dtype=np.int64),
        requant_random_cases(rng, accumulator_width, 150),
    ])
    cases = cases[rng.permutation(len(cases))]
    valid = (rng.random(len(cases)) < 0.9).astype(int)
    check_requantizer(cases, accumulator_width=accumulator_width, output_width=8,
                      valid=valid, rounding=rounding, rng=rng, serial_bits=serial_bits)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("three_products", [True, False])
def test_requantizer_left_shift_matches_arith(rounding, three_products):
    """TFLite's Add pre-shift ((acc + bias)·2**20, wrapping at 32 bits), mixed with plain
    cases one a cycle."""
    rng = np.random.default_rng(11)
    cases = requant_random_cases(rng, 32, 800)
    cases[::2, 0] %= 1024
    left_shift = (rng.random(len(cases)) < 0.6).astype(np.int64)
    check_requantizer(cases, accumulator_width=32, output_width=8, rounding=rounding,
                      left_shift=left_shift, rng=rng, three_products=three_products)


def test_requantizer_inverted_clamp_bounds_match_arith():
    """SETPP accepts clamp_min > clamp_max; arith (np.clip) then gives clamp_max for every
    value, and the requantizer must agree bit for bit."""
    cases = np.array([(acc, 0, INT32_MAX, 0, 0, 5, -5) for acc in (-10, 0, 3, 5, 10)]
                     + [(acc, 0, INT32_MAX, 0, 0, 100, -100) for acc in (-300, 0, 300)],
                     dtype=np.int64)
    check_requantizer(cases, accumulator_width=32, output_width=8)


def test_requant_edge_cases_hit_the_corners():
    """The edge cases really exercise saturation at both ends and the overflow corner."""
    cases = np.array(requant_edge_cases(32), dtype=np.int64)
    out = requantize(*(cases[:, i] for i in range(4)), 0, -32768, 32767,
                     accumulator_width=32, output_width=8)
    assert out.min() == -128 and out.max() == 127
    total = cases[:, 0] + cases[:, 1]
    assert np.any((total == INT32_MIN) & (cases[:, 2] == INT32_MIN))


# -- The whole NPU ------------------------------------------------------------------------------

TINY = NpuConfig(rows=2, cols=2, requant_lanes=1, activation_depth=32, weight_depth=32,
                 accumulator_depth=32,
                 instruction_depth=16, param_depth=16)


class StrictLatencyBus(AmaranthBus):
    """sim/pysim.py's host-port driver, reading one word at a time and checking that each
    answer comes exactly ``host_read_latency`` cycles after its request."""

    async def read_many(self, addresses):
        ctx, host = self.ctx, self.npu.host
        words = []
        ctx.set(host.write, 0)
        for addr in np.asarray(addresses).tolist():
            ctx.set(host.valid, 1)
            ctx.set(host.addr, addr)
            await ctx.tick()
            ctx.set(host.valid, 0)
            latency = host_read_latency(self.npu.config)
            for cycle in range(1, latency):
                assert not ctx.get(host.rvalid), f"rvalid {cycle} cycles after reading {addr:#x}"
                await ctx.tick()
            assert ctx.get(host.rvalid), (f"no rvalid {latency} cycles after reading "
                                          f"{addr:#x}")
            words.append(ctx.get(host.rdata))
        return words


def run_jobs_on_npu(config: NpuConfig, jobs: list[Job]) -> list[tuple[int, list, list]]:
    """Run ``jobs`` one after the other on one simulated NPU with ``hostops.execute``."""
    npu = Npu(config)
    results = []

    async def testbench(ctx):
        bus = StrictLatencyBus(ctx, npu)
        for job in jobs:
            results.append(await execute(bus, bus_program(job, timeout_cycles=2000)))

    simulate(npu, testbench)
    return results


def test_npu_matmul_job_matches_numpy_and_golden_counters():
    """A multi-tile GEMM with bias, then one without, through the host port."""
    rng = np.random.default_rng(5)
    a = rng.integers(-128, 128, (5, 3))
    w = rng.integers(-128, 128, (3, 3))
    bias = rng.integers(-(1 << 20), 1 << 20, 3)
    a2 = rng.integers(-128, 128, (4, 4))
    w2 = rng.integers(-128, 128, (4, 1))
    (job, plan), (job2, plan2) = matmul_job(TINY, a, w, bias), matmul_job(TINY, a2, w2)
    runs = run_jobs_on_npu(TINY, [job, job2])
    for (status, counters, words), job_, plan_, want in (
            (runs[0], job, plan, a @ w + bias), (runs[1], job2, plan2, a2 @ w2)):
        result = decode_result(job_, status, counters, words)
        golden = run_golden(job_)
        assert Status(status) == Status.DONE
        np.testing.assert_array_equal(matmul_output(plan_, result), want)
        np.testing.assert_array_equal(result.outputs["y"], golden.outputs["y"])
        assert result.counters == golden.counters


def test_npu_wide_entries_are_read_a_cycle_later():
    """Accumulator entries of 8 host words (2×8, 32-bit sums): the host reads them a cycle
    later (the entry registered before the word select, ``host_read_latency``), and every
    read, the GEMM's sums and narrow activation words, comes back exact."""
    wide = TINY.replace(cols=8)
    assert host_read_latency(TINY) == 3 and host_read_latency(wide) == 4
    rng = np.random.default_rng(7)
    a, w = rng.integers(-128, 128, (5, 4)), rng.integers(-128, 128, (4, 8))
    bias = rng.integers(-(1 << 20), 1 << 20, 8)
    job, plan = matmul_job(wide, a, w, bias)
    spare = rng.integers(-128, 128, (4, wide.rows))   # narrow entries, read as well
    job.write(Region.ACTIVATIONS, 24, spare)
    job.read("spare", Region.ACTIVATIONS, 24, 4)
    ((status, counters, words),) = run_jobs_on_npu(wide, [job])
    result = decode_result(job, status, counters, words)
    np.testing.assert_array_equal(matmul_output(plan, result), a @ w + bias)
    np.testing.assert_array_equal(result.outputs["spare"], spare)
    assert result.counters == run_golden(job).counters


def test_npu_requant_job_matches_golden():
    """SETPP, SETREQ and REQUANT decode: requantized lanes land where the golden model
    puts them (out_lane 1 spills into the next word block at out_stride)."""
    rng = np.random.default_rng(6)
    c = TINY
    job = Job(c)
    acc = rng.integers(-(1 << 20), 1 << 20, (3, c.cols))
    params = np.stack([rng.integers(-1000, 1000, c.cols),
                       rng.integers(1 << 30, INT32_MAX, c.cols),
                       rng.integers(4, 12, c.cols)], axis=1).reshape(c.cols, 1, 3)
    program = [
        Instruction(Opcode.SETPP, {"zero_point": -3, "clamp_min": -100, "clamp_max": 90}),
        Instruction(Opcode.SETREQ, {"param_addr": 2, "out_stride": 4}),
        Instruction(Opcode.REQUANT, {"acc_addr": 1, "out_addr": 8, "count": 3,
                                     "out_lane": 1}),
        Instruction(Opcode.HALT),
    ]
    job.write(Region.INSTRUCTIONS, 0, encode_program(program))
    job.write(Region.ACCUMULATORS, 1, acc)
    job.write(Region.PARAMS, 2, params)
    job.write(Region.ACTIVATIONS, 8, rng.integers(-128, 128, (8, c.rows)))
    job.read("act", Region.ACTIVATIONS, 8, 8)
    ((status, counters, words),) = run_jobs_on_npu(c, [job])
    result = decode_result(job, status, counters, words)
    golden = run_golden(job)
    np.testing.assert_array_equal(result.outputs["act"], golden.outputs["act"])
    assert result.counters == golden.counters


def test_npu_same_bank_reload_waits_for_its_stream():
    """LOADW right after a MATMUL on the same bank must wait for the stream and its
    in-flight words; results and counters (stalls included) match the golden model."""
    rng = np.random.default_rng(7)
    c = TINY
    job = Job(c)
    program = [
        Instruction(Opcode.LOADW, {"bank": 0, "weight_addr": 0}),
        Instruction(Opcode.MATMUL, {"bank": 0, "act_addr": 0, "acc_addr": 0, "count": 6}),
        Instruction(Opcode.LOADW, {"bank": 0, "weight_addr": 2}),
        Instruction(Opcode.MATMUL, {"bank": 0, "accumulate": 1, "act_addr": 6,
                                    "acc_addr": 0, "count": 6}),
        Instruction(Opcode.LOADW, {"bank": 1, "weight_addr": 4}),
        Instruction(Opcode.MATMUL, {"bank": 1, "act_addr": 0, "acc_addr": 8, "count": 3}),
        Instruction(Opcode.MATMUL, {"bank": 0, "accumulate": 1, "act_addr": 3,
                                    "acc_addr": 8, "count": 3}),
        Instruction(Opcode.HALT),
    ]
    job.write(Region.INSTRUCTIONS, 0, encode_program(program))
    job.write(Region.ACTIVATIONS, 0, rng.integers(-128, 128, (12, c.rows)))
    job.write(Region.WEIGHTS, 0, rng.integers(-128, 128, (6, c.cols)))
    job.read("acc", Region.ACCUMULATORS, 0, 11)
    ((status, counters, words),) = run_jobs_on_npu(c, [job])
    result = decode_result(job, status, counters, words)
    golden = run_golden(job)
    assert golden.counters.stall_cycles > 0
    np.testing.assert_array_equal(result.outputs["acc"], golden.outputs["acc"])
    assert result.counters == golden.counters


@pytest.mark.parametrize("word, config", [
    (15, TINY),
    # SETWIN on an NPU generated without the feature-map hardware.
    (Instruction(Opcode.SETWIN, {"row_length": 3}).encode(), TINY.replace(feature_maps=False)),
], ids=["opcode-15", "setwin-without-feature-maps"])
def test_npu_illegal_opcode_stops_the_run_and_identity_reads_back(word, config):
    """An unknown opcode (or one the NPU was generated without) at address 0 stops the run
    with ILLEGAL_INSTRUCTION (no DONE); the identity block reads back as
    ``identity_words``."""
    npu = Npu(config)
    seen = {}
    identity = identity_words(config)

    async def testbench(ctx):
        bus = StrictLatencyBus(ctx, npu)
        seen["identity"] = await bus.read_many(
            np.array([address(Region.REGISTERS, Reg.MAGIC + i) for i in range(len(identity))]))
        await bus.write_many(
            np.array([address(Region.INSTRUCTIONS, 0), address(Region.INSTRUCTIONS, 1),
                      address(Region.REGISTERS, Reg.START_PC),
                      address(Region.REGISTERS, Reg.CONTROL)]),
            np.array([word & 0xFFFFFFFF, word >> 32, 0, 1]))
        seen["running_after_start"] = ctx.get(npu.running)
        await ctx.tick().repeat(20)
        seen["running"], seen["done"] = ctx.get(npu.running), ctx.get(npu.done)
        (seen["status"],) = await bus.read_many(
            np.array([address(Region.REGISTERS, Reg.STATUS)]))

    simulate(npu, testbench)
    assert seen["identity"] == identity
    assert seen["running_after_start"] == 1
    assert (seen["running"], seen["done"]) == (0, 0)
    assert Status(seen["status"]) == Status.ILLEGAL_INSTRUCTION


def test_npu_decodes_every_address_bit():
    """Addresses outside the map answer 0 and change nothing: no register or memory entry
    is reachable at a second address."""
    npu = Npu(TINY)
    seen = {}
    stride = 2  # 64-bit instruction words
    depth = TINY.instruction_depth

    async def testbench(ctx):
        bus = StrictLatencyBus(ctx, npu)
        await bus.write_many(
            np.array([address(Region.INSTRUCTIONS, 0),
                      address(Region.INSTRUCTIONS, depth * stride),   # one past the end
                      0x1000_0000 | Reg.CONTROL,                       # upper bits set
                      address(Region.REGISTERS, 0x100 | Reg.CONTROL)]),  # offset aliasing
            np.array([0x1234, 0x5678, 1, 1]))
        seen["running"] = ctx.get(npu.running)
        seen["words"] = await bus.read_many(np.array([
            address(Region.INSTRUCTIONS, 0), address(Region.INSTRUCTIONS, depth * stride),
            0x1000_0000 | Reg.MAGIC, address(Region.REGISTERS, 0x100 | Reg.MAGIC),
            address(Region.REGISTERS, Reg.MAGIC), 0x0F00_0000]))

    simulate(npu, testbench)
    assert seen["running"] == 0
    assert seen["words"] == [0x1234, 0, 0, 0, identity_words(TINY)[0], 0]


def test_dsp_mapping_refuses_what_it_cannot_build():
    """The hand mappings say what is wrong instead of building a wrong product: an
    unsigned operand for the signed SB_MAC16 pairs, an unknown DSP register."""
    from amaranth import Module, Signal, signed

    from npugen.hw.dsp import registered_product, registered_products
    from npugen.hw.implementation import Implementation

    with pytest.raises(ValueError, match="takes signed operands"):
        registered_products(Module(), Implementation("ice40"),
                            [(Signal(8), Signal(signed(8))), (Signal(signed(8)),) * 2],
                            name="p")
    with pytest.raises(ValueError, match="register must be 'input' or 'output', not 'both'"):
        registered_product(Module(), Implementation("ecp5"), Signal(signed(8)),
                           Signal(signed(8)), name="p", register="both")
    with pytest.raises(ValueError, match="not both"):
        ProcessingElement(input_width=8, weight_width=8, psum_width=17,
                          shared_multiplier=True, fabric_multiplier=True)


def test_sb_mac16_pairs_register_the_top_product_in_both_models():
    """yosys's SB_MAC16 model registers the top 8×8 product with TOP_8x8_MULT_REG,
    Lattice's model and gate netlist with PIPELINE_16x16_MULT_REG1: the pairs set both
    (as Lattice's SB_MAC16_MUL_S_8X8_ALL_PIPELINE does), so the chip is as simulated, and
    a configuration that sets one only is refused."""
    from amaranth import Module, Signal, signed

    from npugen.hw.dsp import _sb_mac16, registered_products
    from npugen.hw.implementation import Implementation

    m = Module()
    registered_products(m, Implementation("ice40"), [(Signal(signed(8)),) * 2] * 2, name="p")
    parameters = {key: value.value
                  for key, value in m.submodules["p_0_1_sb_mac16"].parameters.items()}
    assert parameters["TOP_8x8_MULT_REG"] == parameters["PIPELINE_16x16_MULT_REG1"] == 1
    assert parameters["BOT_8x8_MULT_REG"] == parameters["MODE_8x8"] == 1
    with pytest.raises(ValueError, match="TOP_8x8_MULT_REG=1 and PIPELINE_16x16_MULT_REG1=0"):
        _sb_mac16(a=Signal(16), b=Signal(16), out=Signal(32), MODE_8x8=1,
                  TOP_8x8_MULT_REG=1)


def test_dsp_rows_follow_the_budget():
    """ECP5 puts at most ECP5_DSP_PRODUCTS of the array's products in MULT18X18Ds, in
    whole rows; an implementation's own budget overrides it; elsewhere every row is in
    DSPs."""
    from npugen.hw.dsp import dsp_rows
    from npugen.hw.implementation import ECP5_DSP_PRODUCTS, GENERIC, Implementation

    ecp5 = Implementation("ecp5")
    assert dsp_rows(ecp5, 8, 8) == 8
    assert dsp_rows(ecp5, 12, 12) == ECP5_DSP_PRODUCTS // 12 == 8
    assert dsp_rows(Implementation("ecp5", dsp_products=3), 2, 3) == 1
    assert dsp_rows(Implementation("ecp5", dsp_products=0), 2, 3) == 0
    assert dsp_rows(Implementation("ice40"), 64, 64) == 64
    assert dsp_rows(GENERIC, 64, 64) == 64


@pytest.mark.parametrize("a_width, b_width", [(8, 8), (4, 4), (8, 3), (2, 8)])
def test_fabric_product_is_the_signed_product(a_width, b_width):
    """``fabric_product`` (the products past the DSP budget, in logic) over every pair of
    operands."""
    from amaranth import Module, Signal, signed
    from amaranth.sim import Simulator

    from npugen.hw.dsp import fabric_product

    a, b = Signal(signed(a_width)), Signal(signed(b_width))
    product = Signal(signed(a_width + b_width))
    m = Module()
    m.d.comb += product.eq(fabric_product(a, b))
    simulator = Simulator(m)
    wrong = []

    async def testbench(ctx):
        for x in range(-(1 << a_width - 1), 1 << a_width - 1):
            for y in range(-(1 << b_width - 1), 1 << b_width - 1):
                ctx.set(a, x)
                ctx.set(b, y)
                if ctx.get(product) != x * y:
                    wrong.append((x, y, ctx.get(product)))

    simulator.add_testbench(testbench)
    simulator.run()
    assert not wrong, wrong[:5]


def test_implementation_defaults_and_names():
    """The family's defaults fill what is not given (ECP5's DSP budget, iCE40's SPRAM for
    the weights); the name keys simulator builds, so it tells apart what builds apart."""
    from npugen.hw.dsp import PRIMITIVE_FAMILIES
    from npugen.hw.implementation import ECP5_DSP_PRODUCTS, FAMILIES, GENERIC, Implementation

    assert set(FAMILIES) == set(PRIMITIVE_FAMILIES)  # every family has its models
    assert Implementation("ecp5").dsp_budget == ECP5_DSP_PRODUCTS
    assert Implementation("ice40").dsp_budget is None and GENERIC.dsp_budget is None
    assert Implementation("ice40").spram_regions == {Region.WEIGHTS, Region.ACTIVATIONS}
    assert Implementation("ice40") == Implementation(
        "ice40", spram_regions=[Region.WEIGHTS, Region.ACTIVATIONS])
    assert Implementation("ecp5").spram_regions == GENERIC.spram_regions == frozenset()
    assert GENERIC.is_generic and not Implementation("ice40").is_generic
    assert not Implementation(dsp_products=4).is_generic
    assert [implementation.name for implementation in (
        GENERIC, Implementation("ecp5"), Implementation("ecp5", dsp_products=40),
        Implementation("ice40", spram_regions=()),
        Implementation("ice40", spram_regions={Region.WEIGHTS}))] == [
        "generic", "ecp5", "ecp5-dsp40", "ice40-spram-none", "ice40-spram-weights"]


def test_spram_plan_gives_the_weights_first_and_single_port_activations_the_rest():
    """On iCE40 the weights take their SPRAM blocks first; the activations take two of
    the four only when single-port and when blocks are left, else they stay in block RAM,
    as every memory does elsewhere."""
    from npugen.hw.implementation import GENERIC, Implementation
    from npugen.hw.ram import spram_plan
    from npugen.memory_map import memories

    ice40 = Implementation("ice40")
    lean = NpuConfig(rows=4, cols=4, requant_lanes=1, activation_depth=16384,
                     weight_depth=16384, single_port_activations=True)
    plan = spram_plan(ice40, memories(lean))
    assert (plan[Region.WEIGHTS], plan[Region.ACTIVATIONS], sum(plan.values())) == (2, 2, 4)
    assert spram_plan(ice40, memories(lean.replace(weight_depth=32768)))[
        Region.ACTIVATIONS] == 0
    assert spram_plan(ice40, memories(lean.replace(single_port_activations=False)))[
        Region.ACTIVATIONS] == 0
    assert spram_plan(Implementation("ice40", spram_regions={Region.WEIGHTS}),
                      memories(lean))[Region.ACTIVATIONS] == 0
    assert not any(spram_plan(GENERIC, memories(lean)).values())


def test_implementation_refuses_what_it_cannot_build():
    """Each bad parameter is refused with its value: an unknown family, a negative budget,
    SPRAM regions that are not memories or not on iCE40; a component takes nothing else."""
    from npugen.hw.implementation import Implementation, check_implementation

    with pytest.raises(ValueError, match="family must be one of ecp5, ice40, or \"\" for "
                                         "the generic design, not 'gowin'"):
        Implementation("gowin")
    with pytest.raises(ValueError, match="dsp_products must be a non-negative integer or "
                                         "None, not -1"):
        Implementation("ecp5", dsp_products=-1)
    with pytest.raises(ValueError, match="dsp_products must be .*, not True"):
        Implementation("ecp5", dsp_products=True)
    with pytest.raises(ValueError, match="spram_regions must be memory regions .*REGISTERS"):
        Implementation("ice40", spram_regions={Region.REGISTERS})
    with pytest.raises(ValueError, match="spram_regions must be memory regions .*'weights'"):
        Implementation("ice40", spram_regions="weights")
    with pytest.raises(ValueError, match="only iCE40 has SPRAM: spram_regions must be empty "
                                         "for family 'ecp5', not \\['WEIGHTS'\\]"):
        Implementation("ecp5", spram_regions={Region.WEIGHTS})
    with pytest.raises(TypeError, match="implementation must be an Implementation, not 'ecp5'"):
        check_implementation("ecp5")  # what each component's constructor does with it


# -- Memories -------------------------------------------------------------------------------

def test_power_of_two_parts_are_the_binary_digits():
    from npugen.hw.ram import power_of_two_parts

    assert power_of_two_parts(9216) == [8192, 1024]
    assert power_of_two_parts(7936) == [4096, 2048, 1024, 512, 256]
    assert power_of_two_parts(4096) == [4096]


@pytest.mark.parametrize("depth", [768, 1280, 1792])
def test_stacked_memory_reads_what_it_wrote(depth):
    """A memory whose depth is not a power of two (hw/ram.py's StackedMemory: 768 = 512 +
    256, 1280 = 1024 + 256, 1792 = 1024 + 512 + 256) against a list: random lane writes,
    a transparent read port and a plain one (the accumulators' copy), each address of
    every part, reads held while their port is disabled."""
    from amaranth import Module

    from npugen.hw.ram import StackedMemory
    from npugen.memory_map import MemoryInfo

    info = MemoryInfo(name="mem", region=Region.ACTIVATIONS, depth=depth, width=16,
                      granularity=8)
    memory = StackedMemory(info)
    write = memory.write_port(granularity=8)
    transparent = memory.read_port(transparent_for=(write,))
    plain = memory.read_port()
    top = Module()
    top.submodules.mem = memory
    rng = np.random.default_rng(depth)
    model = [0] * depth

    async def testbench(ctx):
        held = None
        for _ in range(3000):
            addr, read_addr = (int(a) for a in rng.integers(0, depth, 2))
            lanes, word = int(rng.integers(0, 4)), int(rng.integers(0, 1 << 16))
            enabled = bool(rng.random() < 0.8)
            ctx.set(write.addr, addr)
            ctx.set(write.data, word)
            ctx.set(write.en, lanes)
            ctx.set(transparent.addr, addr)
            ctx.set(plain.addr, read_addr)
            ctx.set(plain.en, enabled)
            old = model[read_addr]
            await ctx.tick()
            for lane in range(2):
                if lanes >> lane & 1:
                    mask = 0xFF << 8 * lane
                    model[addr] = model[addr] & ~mask | word & mask
            assert ctx.get(transparent.data) == model[addr]
            if enabled:
                held = old   # not transparent: a word written in the read's cycle is new
            if held is not None:
                assert ctx.get(plain.data) == held
        assert any(model[k] for k in range(depth - 256, depth))

    simulate(top, testbench)


def test_a_colliding_read_is_poisoned_in_simulation():
    """Memories whose collisions are don't-care carry ``no_rw_check`` (and the board
    build marks their read ports so, not the transparent ones); a simulation with
    ``poison_collisions`` returns the lanes written in the read's cycle inverted (so a
    test that used such a read fails), and the old word otherwise."""
    from amaranth import Module
    from amaranth.back import rtlil

    from npugen.hw.implementation import GENERIC, Implementation
    from npugen.hw.ram import collisions_dont_care, memory_ports
    from npugen.memory_map import Region, memories

    infos = memories(NpuConfig(rows=4, cols=4))
    info = infos[Region.ACTIVATIONS]   # four 8-bit lanes
    m = Module()
    write, read = memory_ports(m, Implementation(poison_collisions=True), info)
    # The accumulators' port is transparent: its collisions matter, and stay unmarked.
    acc_write, acc_read = memory_ports(m, GENERIC, infos[Region.ACCUMULATORS],
                                       transparent=True)
    text = rtlil.convert(m, ports=[write.addr, write.data, write.en, read.addr, read.data,
                                   acc_write.addr, acc_write.data, acc_write.en,
                                   acc_read.addr, acc_read.data])
    marked, ports = collisions_dont_care(text)
    assert ports == 1 and text.count("no_rw_check") == 1
    assert marked.count("COLLISION_X_MASK 1'1") == 1
    assert marked.count("COLLISION_X_MASK 1'0") == text.count("COLLISION_X_MASK 1'0") - 1

    async def testbench(ctx):
        ctx.set(write.addr, 5)
        ctx.set(write.data, 0x44332211)
        ctx.set(write.en, 0b1111)
        await ctx.tick()
        ctx.set(write.data, 0x88776655)
        ctx.set(write.en, 0b0101)           # lanes 0 and 2 of word 5, read in the same cycle
        ctx.set(read.addr, 5)
        await ctx.tick()
        ctx.set(write.en, 0)
        assert ctx.get(read.data) == 0x44332211 ^ 0x00FF00FF
        await ctx.tick()
        assert ctx.get(read.data) == 0x44772255   # no collision: the word as written
        ctx.set(write.addr, 6)
        ctx.set(write.en, 0b1111)           # another word: no poison
        await ctx.tick()
        assert ctx.get(read.data) == 0x44772255

    simulate(m, testbench)
