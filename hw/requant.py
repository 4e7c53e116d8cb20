"""Post-processing of one accumulator: the TFLite int8 requantization pipeline."""

from amaranth import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..golden import REQUANT_PIPELINE_STAGES

__all__ = ["Requantizer"]


class Requantizer(wiring.Component):
    """acc + bias (wrapping) → rounding doubling high multiply by a Q31 multiplier →
    rounding right shift → + zero point → clamp → saturate to ``output_width``.

    Bit-exact with :func:`npugen.arith.requantize`. ``latency`` registers from input to
    ``out`` (one stage each: bias; multiply; nudge; divide by 2**31; the rounding shift's
    operands; round; zero point; clamp and saturation), so that no stage chains more than
    one wide carry; ``zero_point`` is read in the seventh stage, the clamp bounds in the
    last.
    """

    latency = REQUANT_PIPELINE_STAGES

    def __init__(self, *, accumulator_width: int, output_width: int):
        if not 16 <= accumulator_width <= 32:
            raise ValueError(f"accumulator_width must be 16 to 32, not {accumulator_width!r}")
        self._acc_width = accumulator_width
        self._out_width = output_width
        super().__init__({
            "valid": In(1),
            "acc": In(signed(accumulator_width)),
            "bias": In(signed(accumulator_width)),
            "multiplier": In(signed(32)),
            "shift": In(unsigned(5)),
            "zero_point": In(signed(16)),
            "clamp_min": In(signed(16)),
            "clamp_max": In(signed(16)),
            "out_valid": Out(1),
            "out": Out(signed(output_width)),
        })

    def elaborate(self, platform):
        m = Module()
        int32_min = -(1 << 31)
        # Stage 1: bias, wrapping at the accumulator width.
        total = Signal(signed(self._acc_width))
        multiplier1 = Signal(signed(32))
        shift1 = Signal(5)
        valid1 = Signal()
        m.d.sync += [total.eq(self.acc + self.bias), multiplier1.eq(self.multiplier),
                     shift1.eq(self.shift), valid1.eq(self.valid)]
        # Stage 2: the 32 × 32 product.
        product = Signal(signed(64))
        overflow = Signal()
        shift2 = Signal(5)
        valid2 = Signal()
        m.d.sync += [product.eq(total * multiplier1),
                     overflow.eq((total == int32_min) & (multiplier1 == int32_min)),
                     shift2.eq(shift1), valid2.eq(valid1)]
        # Stage 3: round to nearest (nudge).
        nudge = Mux(product[63], Const(1 - (1 << 30), signed(32)), Const(1 << 30, signed(32)))
        nudged = Signal(signed(66))
        overflow3 = Signal()
        shift3 = Signal(5)
        valid3 = Signal()
        m.d.sync += [nudged.eq(product + nudge), overflow3.eq(overflow), shift3.eq(shift2),
                     valid3.eq(valid2)]
        # Stage 4: divide by 2**31, truncating toward zero.
        floor = nudged >> 31
        inexact = nudged[0:31].any()
        quotient = Signal(signed(35))
        m.d.comb += quotient.eq(floor + (nudged[65] & inexact))
        high = Signal(signed(32))
        shift4 = Signal(5)
        valid4 = Signal()
        m.d.sync += [high.eq(Mux(overflow3, (1 << 31) - 1, quotient[0:32].as_signed())),
                     shift4.eq(shift3), valid4.eq(valid3)]
        # Stage 5: rounding right shift, its operands (shifted value, remainder, threshold).
        mask = Signal(32)
        m.d.comb += mask.eq((Const(1, 33) << shift4) - 1)
        truncated = Signal(signed(32))
        remainder = Signal(32)
        threshold = Signal(32)
        valid5 = Signal()
        m.d.sync += [truncated.eq(high >> shift4), remainder.eq(high.as_unsigned() & mask),
                     threshold.eq((mask >> 1) + high[31]), valid5.eq(valid4)]
        # Stage 6: round.
        shifted = Signal(signed(33))
        valid6 = Signal()
        m.d.sync += [shifted.eq(truncated + (remainder > threshold)), valid6.eq(valid5)]
        # Stage 7: zero point.
        with_zero = Signal(signed(34))
        valid7 = Signal()
        m.d.sync += [with_zero.eq(shifted + self.zero_point), valid7.eq(valid6)]
        # Stage 8: clamp (max, then min: like np.clip, even if the bounds are inverted) and
        # saturate. Every comparison of with_zero runs in parallel; the bounds' own
        # comparisons and saturated values do not depend on the data.
        low, high_bound = -(1 << (self._out_width - 1)), (1 << (self._out_width - 1)) - 1

        def saturate(value):
            return Mux(value < low, low, Mux(value > high_bound, high_bound, value))

        below_min = with_zero < self.clamp_min
        above_max = with_zero > self.clamp_max
        # After max(with_zero, clamp_min): is it above clamp_max?
        raised_above_max = Mux(below_min, self.clamp_min > self.clamp_max, above_max)
        m.d.sync += [
            self.out.eq(Mux(raised_above_max, saturate(self.clamp_max),
                            Mux(below_min, saturate(self.clamp_min), saturate(with_zero)))),
            self.out_valid.eq(valid7),
        ]
        return m
