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
    ``out`` (one stage each: bias; multiply; round and divide by 2**31; rounding shift;
    zero point, clamp and saturation); ``zero_point`` and the clamp bounds are read in the
    last stage.
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
        # Stage 3: round to nearest (nudge), divide by 2**31 truncating toward zero.
        nudge = Mux(product[63], Const(1 - (1 << 30), signed(32)), Const(1 << 30, signed(32)))
        nudged = Signal(signed(66))
        m.d.comb += nudged.eq(product + nudge)
        floor = nudged >> 31
        inexact = nudged[0:31].any()
        quotient = Signal(signed(35))
        m.d.comb += quotient.eq(floor + (nudged[65] & inexact))
        high = Signal(signed(32))
        shift3 = Signal(5)
        valid3 = Signal()
        m.d.sync += [high.eq(Mux(overflow, (1 << 31) - 1, quotient[0:32].as_signed())),
                     shift3.eq(shift2), valid3.eq(valid2)]
        # Stage 4: rounding right shift.
        mask = Signal(32)
        m.d.comb += mask.eq((Const(1, 33) << shift3) - 1)
        remainder = high.as_unsigned() & mask
        threshold = Signal(32)
        m.d.comb += threshold.eq((mask >> 1) + high[31])
        shifted = Signal(signed(33))
        valid4 = Signal()
        m.d.sync += [shifted.eq((high >> shift3) + (remainder > threshold)), valid4.eq(valid3)]
        # Stage 5: zero point, clamp, saturate.
        with_zero = Signal(signed(34))
        m.d.comb += with_zero.eq(shifted + self.zero_point)
        # max, then min: like np.clip, even if the bounds are inverted.
        raised = Mux(with_zero < self.clamp_min, self.clamp_min, with_zero)
        clamped = Signal(signed(34))
        m.d.comb += clamped.eq(Mux(raised > self.clamp_max, self.clamp_max, raised))
        low, high_bound = -(1 << (self._out_width - 1)), (1 << (self._out_width - 1)) - 1
        m.d.sync += [
            self.out.eq(Mux(clamped < low, low, Mux(clamped > high_bound, high_bound, clamped))),
            self.out_valid.eq(valid4),
        ]
        return m
