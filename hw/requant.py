"""Post-processing of one accumulator: the TFLite int8 requantization pipeline."""

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..arith import ADD_LEFT_SHIFT
from ..config import ROUNDINGS
from ..layouts import SHIFT_BITS
from ..timing import (
    REQUANT_PIPELINE_STAGES,
    SERIAL_SHIFT_STEP,
    requant_lane_latency,
    requant_product_cycles,
    requant_shift_cycles,
)
from .dsp import registered_product, wide_products
from .implementation import GENERIC, Implementation, check_implementation

__all__ = ["Requantizer"]


def _add_with_carry(a, b, carry):
    """a + b + carry (one bit) as one sum: (2a + carry + 2b + 1) / 2, so that yosys makes
    one carry chain, where a signed a + b plus an unsigned bit would take two."""
    return (Cat(carry, a).as_signed() + Cat(Const(1, 1), b).as_signed()) >> 1


class Requantizer(wiring.Component):
    """acc + bias (wrapping) → rounding doubling high multiply by a Q31 multiplier →
    rounding right shift → + zero point → clamp → saturate to ``output_width``; ``raw``
    is the value before the clamp (REQUANT to_acc). With ``left_shift`` (when built with
    it), acc + bias is first multiplied by 2**20 (TFLite's Add). ``rounding``: ``double``
    (gemmlowp), ``single`` (one rounding of the exact product), or ``both``: each sample's
    ``single`` input chooses (read only by that build). A sample's ``even`` input takes a
    value exactly halfway at the last rounding to the even result instead of up (single)
    or away from zero (double): ONNX's QuantizeLinear (read by builds with ``single`` or
    ``both``).

    Bit-exact with :func:`npugen.arith.requantize`. ``latency`` registers from input to
    ``out`` (one stage each: bias; the products of 16-bit halves; their sum; nudge and divide by
    2**31; the rounding shift; round and zero point; clamp and saturation), so that no
    stage chains more than two carries; ``zero_point`` and the clamp bounds are read in
    the stage before last.

    ``implementation``: whose DSP blocks take the products (hw/dsp.py): three, or four on
    iCE40 (``wide_products``); ``three_products`` overrides that choice (tests).

    ``serial_bits`` (``NpuConfig.requant_serial_bits``): the product made in logic instead,
    that many bits of the accumulator a cycle (no DSP block, no ``left_shift``): one sample
    every ``product_cycles`` cycles at most, ``latency`` ``requant_lane_latency`` of them
    (sw/timing.py).
    """

    #: The latency with the product in DSP blocks; an instance's is its own.
    latency = REQUANT_PIPELINE_STAGES

    def __init__(self, *, accumulator_width: int, output_width: int, rounding: str = "double",
                 left_shift: bool = True, implementation: Implementation = GENERIC,
                 three_products: bool | None = None, serial_bits: int = 0):
        if not 16 <= accumulator_width <= 32:
            raise ValueError(f"accumulator_width must be 16 to 32, not {accumulator_width!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {', '.join(map(repr, ROUNDINGS))}, "
                             f"not {rounding!r}")
        self._acc_width = accumulator_width
        self._out_width = output_width
        self._rounding = rounding
        self._left_shift = left_shift
        self._implementation = check_implementation(implementation)
        self._three_products = (wide_products(implementation) if three_products is None
                                else three_products)
        if not 0 <= serial_bits < accumulator_width:
            raise ValueError(f"serial_bits must be 0 to {accumulator_width - 1}, "
                             f"not {serial_bits!r}")
        if serial_bits and left_shift:
            raise ValueError("a serial product has no left_shift (TFLite's Add): build it "
                             "with left_shift=False")
        self._serial_bits = serial_bits
        self.product_cycles = requant_product_cycles(accumulator_width, serial_bits)
        self.shift_cycles = requant_shift_cycles(self.product_cycles)
        self.latency = requant_lane_latency(self.product_cycles)
        super().__init__({
            "valid": In(1),
            "acc": In(signed(accumulator_width)),
            "bias": In(signed(accumulator_width)),
            "multiplier": In(signed(32)),
            "shift": In(unsigned(SHIFT_BITS)),
            "zero_point": In(signed(16)),
            "clamp_min": In(signed(16)),
            "clamp_max": In(signed(16)),
            "left_shift": In(1),
            "single": In(1),
            "even": In(1),
            "out_valid": Out(1),
            "out": Out(signed(output_width)),
            "raw": Out(signed(accumulator_width)),
        })

    def elaborate(self, platform):
        m = Module()
        # Stage 1: bias, wrapping at the accumulator width.
        # Past the multipliers' operands only the valid bits are reset: the rest is data
        # that they say when to use, and a reset line to each lane's few hundred
        # flip-flops costs routing (hw/pe.py). The operands keep theirs: yosys's iCE40
        # mapping would move reset-less registers into the SB_MAC16s (see below).
        total = (self.acc + self.bias)[0:self._acc_width].as_signed()
        # Stages 2-3 (or the serial product's): the product of a = acc + bias (wrapping;
        # with left_shift times 2**20) and the multiplier, registered, with the sample's
        # other fields beside it: product, overflow, shift, valid, single, even.
        if self._serial_bits:
            at3 = self._serial_product(m, total)
        else:
            at3 = self._parallel_product(m, total)
        product, overflow, shift3, valid3, single3, even3 = at3
        both = self._rounding == "both"
        # With the rounding shift in place (a serial product slower than the shift), the
        # stage-4 registers load only with a sample and hold it through the shift.
        in_place = self.shift_cycles > 1
        load4 = []
        single4 = Signal(reset_less=True)
        even4 = Signal(reset_less=True)
        if both:
            load4.append(single4.eq(single3))
        if self._rounding != "double":
            load4.append(even4.eq(even3))
        # The single-rounding quotient needs 33 bits (the product of two −2**31 is 2**62).
        high_next = Signal(signed(32 if self._rounding == "double" else 33))
        # single rounding: the product's bit 30 (the rounding bit at shift 0)
        half_next = Signal()
        sticky = Signal(reset_less=True)   # single rounding: any of the product's bits 0 to 29
        shift4 = Signal(SHIFT_BITS, reset_less=True)
        valid4 = Signal()
        load4 += [shift4.eq(shift3), valid4.eq(valid3)]
        if self._rounding != "double":
            load4.append(sticky.eq(product[0:30].any()))
        if self._rounding == "double":
            # Stage 4: gemmlowp's nudge (2**30, or 1 - 2**30 below zero) and division by
            # 2**31 truncating toward zero. With p = q·2**31 + r (0 <= r < 2**31), both signs
            # come to q + 1 exactly when r >= 2**30, so it is q plus bit 30 of the product:
            # one incrementer instead of a 66-bit sum and a correction.
            quotient = Signal(signed(33))
            m.d.comb += quotient.eq((product >> 31) + product[30])
            m.d.comb += high_next.eq(Mux(overflow, (1 << 31) - 1, quotient[0:32].as_signed()))
        elif self._rounding == "single":
            # Stage 4: floor(product / 2**31); the single rounding happens in stage 5:
            # floor((p + 2**(30+s)) / 2**(31+s)) = (q >> s) + (s ? q[s−1] : p[30]).
            m.d.comb += [high_next.eq(product[31:64].as_signed()), half_next.eq(product[30])]
        else:
            # Stage 4, both: the two differ only in where bit 30 of the product goes, so
            # one incrementer serves both. Double: high = q + p[30] (INT32_MAX on overflow),
            # half = 0. Single: high = q, half = p[30]. q + p[30] <= 2**31 (q = 2**31 only
            # for p = 2**62, whose bit 30 is 0), so 33 bits hold it, and double's value,
            # in int32 unless it overflows, is its 32-bit high sign-extended.
            double3 = ~single3
            quotient = Signal(signed(33))
            m.d.comb += quotient.eq((product >> 31) + (product[30] & double3))
            m.d.comb += [high_next.eq(Mux(overflow & double3, (1 << 31) - 1, quotient)),
                         half_next.eq(product[30] & single3)]
        # Stage 5: rounding right shift by s: the truncated value and whether to round up.
        # The remainder r = high mod 2**s against gemmlowp's threshold 2**(s-1) - 1 (+ 1 when
        # high < 0) reduces to bits of high, with no mask, adder or compare: r reaches
        # 2**(s-1) when bit s-1 (the half) is set, and passes it when a bit below is set too.
        # So double rounds up on the half, if high is negative only with a bit below it set
        # (half away from zero); single on the half (half up), at s = 0 on the product's
        # bit 30 (both: double's half is 0, so at s = 0 neither rounds up). With ties to
        # even, either rounds up on the half only if a bit below it is set (of high; for
        # single also the product's bit 30 when s > 0 and its bits 0 to 29) or the
        # truncated value is odd. Of v = (high, half) shifted right by s, bit 0 is the half
        # and the bits above it the truncated value; the bits below the half are those
        # shifted out (double's half is 0, so they are high's bits below bit s − 1).
        if in_place:
            shifted, shifted_out, valid5 = self._shift_in_place(m, load4, high_next, half_next,
                                                                 shift3, valid3)
            sign = shifted[-1]
        else:
            m.d.sync += load4
            high = Signal(signed(len(high_next)), reset_less=True)
            half = Signal(reset_less=True)
            m.d.sync += high.eq(high_next)
            if self._rounding != "double":
                m.d.sync += half.eq(half_next)
            half_in = Const(0, 1) if self._rounding == "double" else half
            # One shift gives the truncated value above the half.
            shifted = Cat(half_in, high).as_signed() >> shift4
            sign = high[-1]
            # Bit i of `below` is set when i < s (a decoder: yosys would give each
            # comparison with a constant a carry chain). Builds with single rounding
            # register it in stage 4 (from s before its register): ties to even read its
            # bit 0 for any value, and a combinational decoder of a register that has not
            # changed since time 0 stays undefined in an event-driven simulator (Icarus).
            below = Signal(32, reset_less=True)
            decoded = m.d.comb if self._rounding == "double" else m.d.sync
            with m.Switch(shift4 if self._rounding == "double" else shift3):
                for k in range(1 << SHIFT_BITS):
                    with m.Case(k):
                        decoded += below.eq((1 << k) - 1)
            shifted_out = (Cat(half_in, high[0:31]) & below).any()
        below_half = shifted_out
        if self._rounding != "double":
            # Single rounding's choice at the half: up, or to the even result.
            below_single = shifted_out | sticky
            single_up = ~even4 | below_single | shifted[1]
        if self._rounding == "single":
            round_up_next = shifted[0] & single_up
        else:
            # The sign (both: of double's value, sign-extended to 33 bits).
            away = ~sign | below_half
            if both:  # single rounds up on the half, whatever the sign (or to even)
                away = Mux(single4, single_up,
                           Mux(even4, below_half | shifted[1], away))
            round_up_next = shifted[0] & away
        if in_place:   # stage 6 adds straight from the shift's register
            truncated, round_up = shifted[1:33].as_signed(), round_up_next
        else:
            truncated = Signal(signed(32), reset_less=True)
            round_up = Signal(reset_less=True)
            valid5 = Signal()
            m.d.sync += [round_up.eq(round_up_next), truncated.eq(shifted[1:33].as_signed()),
                         valid5.eq(valid4)]
        # Stage 6: round and add the zero point (one carry chain, rounding as carry-in).
        with_zero = Signal(signed(34), reset_less=True)
        valid6 = Signal()
        m.d.sync += [with_zero.eq(truncated + self.zero_point + round_up), valid6.eq(valid5)]
        # Stage 7: clamp (max, then min: like np.clip, even if the bounds are inverted) and
        # saturate. Clipping to [clamp_min, clamp_max] then saturating is one clamp to
        # [lower, upper] = [sat(min(clamp_min, clamp_max)), sat(clamp_max)] (lower <=
        # upper), bounds of the output's width that depend on the settings only. So the
        # value is compared as output_width bits when it fits them (out of range it is
        # below or above both by its sign): carry chains of output_width bits, not of 34.
        width = self._out_width
        out_low, out_high = -(1 << (width - 1)), (1 << (width - 1)) - 1

        def fits(value):
            """Whether ``value`` fits the output's width: its bits from the output's sign
            up all equal (a LUT tree, where a compare would take a carry chain)."""
            top = value[width - 1:]
            return top.all() | ~top.any()

        def saturate(value):
            return Mux(fits(value), value[0:width].as_signed(),
                       Mux(value[-1], out_low, out_high))

        # Registered beside with_zero: the bounds' compares and saturation then leave the
        # data's path (the settings hold through a REQUANT). sat(min(clamp_min, clamp_max))
        # is min(sat(clamp_min), sat(clamp_max)): a compare of output_width bits.
        saturated_min = saturate(self.clamp_min)
        saturated_max = saturate(self.clamp_max)
        lower = Signal(signed(width), reset_less=True)
        upper = Signal(signed(width), reset_less=True)
        m.d.sync += [
            lower.eq(Mux(saturated_min > saturated_max, saturated_max, saturated_min)),
            upper.eq(saturated_max),
        ]
        in_range = Signal()
        m.d.comb += in_range.eq(fits(with_zero))
        value = with_zero[0:width].as_signed()
        negative = with_zero[-1]
        below_lower = Mux(in_range, value < lower, negative)
        above_upper = Mux(in_range, value > upper, ~negative)
        m.d.sync += [
            self.out.eq(Mux(below_lower, lower, Mux(above_upper, upper, value))),
            self.raw.eq(with_zero[0:self._acc_width]),
            self.out_valid.eq(valid6),
        ]
        return m

    def _shift_in_place(self, m, load4, high_next, half_next, shift3, valid3):
        """Stages 4-5 with the rounding shift in place (``shift_cycles`` > 1): the value
        (high, half) and the stage-4 registers (``load4``) load with a sample
        (``valid3``), and the value shifts right ``SERIAL_SHIFT_STEP`` bits or 1 a cycle
        until the sample's shift is done. Returns the shifted value (the half in bit 0),
        whether a set bit was shifted out, and stage 6's valid: ``shift_cycles`` cycles
        after the load, when any shift is done; the next sample loads no sooner (the
        serial product takes longer)."""
        half = half_next if self._rounding != "double" else Const(0, 1)
        value = Signal(signed(len(high_next) + 1), reset_less=True)
        left = Signal(SHIFT_BITS, reset_less=True)   # bits still to shift
        shifted_out = Signal(reset_less=True)
        countdown = Signal(range(self.shift_cycles + 2))
        step = SERIAL_SHIFT_STEP
        with m.If(valid3):
            m.d.sync += [*load4, value.eq(Cat(half, high_next)), left.eq(shift3),
                         shifted_out.eq(0), countdown.eq(self.shift_cycles + 1)]
        with m.Else():
            with m.If(left >= step):
                m.d.sync += [value.eq(value >> step), left.eq(left - step),
                             shifted_out.eq(shifted_out | value[0:step].any())]
            with m.Elif(left != 0):
                m.d.sync += [value.eq(value >> 1), left.eq(left - 1),
                             shifted_out.eq(shifted_out | value[0])]
            with m.If(countdown != 0):
                m.d.sync += countdown.eq(countdown - 1)
        return value, shifted_out, countdown == 1

    def _side_fields(self, m, stages: int):
        """The sample's shift, single and even registered ``stages`` times beside it (each
        only if this build reads it): lists from the input (index 0) to stage ``stages``."""
        shift_at = [self.shift, *(Signal(SHIFT_BITS, name=f"shift{i}", reset_less=True)
                                  for i in range(1, stages + 1))]
        single_at = [self.single, *(Signal(name=f"single{i}", reset_less=True)
                                    for i in range(1, stages + 1))]
        even_at = [self.even, *(Signal(name=f"even{i}", reset_less=True)
                                for i in range(1, stages + 1))]
        for i in range(1, stages + 1):
            m.d.sync += shift_at[i].eq(shift_at[i - 1])
            if self._rounding == "both":
                m.d.sync += single_at[i].eq(single_at[i - 1])
            if self._rounding != "double":
                m.d.sync += even_at[i].eq(even_at[i - 1])
        return shift_at, single_at, even_at

    def _parallel_product(self, m, total):
        """Stages 1-3: a·b in DSP blocks, one sample a cycle."""
        int32_min = -(1 << 31)
        total1 = Signal(signed(self._acc_width))
        multiplier1 = Signal(signed(32))
        valid1 = Signal()
        left_shift1 = Signal(reset_less=True)
        m.d.sync += [total1.eq(total), multiplier1.eq(self.multiplier),
                     valid1.eq(self.valid), left_shift1.eq(self.left_shift)]
        shift_at, single_at, even_at = self._side_fields(m, 3)
        # Stages 2-3: the 32 × 32 product from products of 16-bit halves (one DSP block
        # apiece), with a = a1·2^16 + a0 (a0 unsigned), b likewise. Where the blocks take
        # 18-bit signed operands (wide_products: not iCE40's 16 × 16 SB_MAC16), three
        # (Karatsuba): a·b = a1·b1·2^32 + a0·b0 + ((a1 + a0)(b1 + b0) − a1·b1 − a0·b0)·2^16,
        # a1 + a0 and b1 + b0 in 18 bits. Else four of one signedness each:
        # a1·b0 = a1·(b0 − 2^15) + a1·2^15, likewise a0·b1, so
        # a·b = a1·b1·2^32 + a0·b0 + (a1·(b0 − 2^15) + (a0 − 2^15)·b1 + (a1 + b1)·2^15)·2^16.
        a = Signal(signed(32))
        if self._left_shift:
            m.d.comb += a.eq(Mux(left_shift1, (total1 << ADD_LEFT_SHIFT)[0:32], total1))
        else:
            m.d.comb += a.eq(total1)
        b = multiplier1
        a1, a0, b1, b0 = a[16:32].as_signed(), a[0:16], b[16:32].as_signed(), b[0:16]
        overflow2 = Signal(reset_less=True)
        valid2 = Signal()
        m.d.sync += [overflow2.eq((a == int32_min) & (b == int32_min)), valid2.eq(valid1)]
        # Registered products (hw/dsp.py: on ECP5 a MULT18X18D with its output register, so
        # the multiplier ends in the block and only routing precedes the sum below).
        # With reset (unlike the PE's product): yosys's iCE40 mapping that moves reset-less
        # registers into the SB_MAC16s computes wrong products here (tests/test_gate_level.py).

        def product(name, x, y):
            return registered_product(m, self._implementation, x, y, name=name, reset=True,
                                      register="output")

        # Stage 3: the product; the middle terms are summed first (two carry chains).
        if self._three_products:
            p11, p00 = product("p11", a1, b1), product("p00", a0, b0)
            pm = product("pm", (a1 + a0).as_signed(), (b1 + b0).as_signed())
            middle = pm - p11 - p00.as_unsigned()
        else:
            cross = Signal(signed(17), reset_less=True)
            m.d.sync += cross.eq(a1 + b1)
            # x − 2^15 for an unsigned 16-bit x is x with its top bit flipped, as signed.
            a0_centred = Cat(a0[0:15], ~a0[15]).as_signed()
            b0_centred = Cat(b0[0:15], ~b0[15]).as_signed()
            p11, p10, p01, p00 = (product(name, x, y) for name, x, y in (
                ("p11", a1, b1), ("p10", a1, b0_centred), ("p01", a0_centred, b1),
                ("p00", a0, b0)))
            middle = p10 + p01 + (cross << 15)
        full = Signal(signed(64), reset_less=True)
        overflow = Signal(reset_less=True)
        valid3 = Signal()
        m.d.sync += [full.eq(Cat(p00, p11).as_signed() + (middle << 16)),
                     overflow.eq(overflow2), valid3.eq(valid2)]
        return full, overflow, shift_at[3], valid3, single_at[3], even_at[3]

    def _serial_product(self, m, total):
        """a·b in logic, ``serial_bits`` bits of a a cycle: a new sample every
        ``product_cycles`` cycles at most. The stage-1 registers load with ``valid``. Each
        cycle after, the terms of the next ``k`` bits of a (Booth-recoded, times b) are
        summed into a register; in each of the ``product_cycles`` cycles from the second,
        a step adds that sum to a partial sum kept shifted right by the bits done, the bits
        it passes collected below it. The product and the sample's fields are ready the
        cycle after the last step, and the next sample's first step overwrites them only
        at that cycle's end.

        Booth's recoding: a = Σ (a[i−1] − a[i])·2**i (a[−1] = 0, a sign-extended), so each
        pair of bits with the one below is a digit of −2 to 2 and a last odd bit one of −1
        to 1; the sign needs no last-step correction. A digit's term is b or 2b, inverted
        when negative, its +1 a carry-in. The terms are summed a cycle ahead, so that the
        partial sum's loop is one carry chain; they are summed in series, ⌈k/2⌉ − 1 carry
        chains before their register (one at the UP5K's k = 4)."""
        k, steps = self._serial_bits, self.product_cycles
        int32_min = -(1 << 31)
        width = 36 + k
        a_bits = k * steps   # a, sign-extended to whole steps
        a_rest = Signal(signed(a_bits), reset_less=True)   # the bits not yet taken
        below = Signal(reset_less=True)   # the bit under a_rest's bit 0 (Booth's a[i−1])
        b = Signal(signed(32), reset_less=True)
        # The sample's fields, from the input (1) and from its terms' first cycle (2): the
        # next sample loads the first before this one's last step.
        shift1, shift2 = (Signal(SHIFT_BITS, name=f"shift{i}", reset_less=True) for i in (1, 2))
        single1, single2, even1, even2 = (Signal(name=name, reset_less=True)
                                          for name in ("single1", "single2", "even1", "even2"))
        summing = Signal()       # the cycle after valid: the first step's terms are summed
        first = Signal()         # the first step's cycle
        remaining = Signal(range(steps + 1))   # steps left, this one included
        with m.If(self.valid):
            m.d.sync += [a_rest.eq(total), below.eq(0), b.eq(self.multiplier),
                         shift1.eq(self.shift), single1.eq(self.single),
                         even1.eq(self.even)]
        with m.Else():   # past the last digits, a_rest shifts its sign: never summed
            m.d.sync += [a_rest.eq(a_rest >> k), below.eq(a_rest[k - 1])]
        m.d.sync += [summing.eq(self.valid), first.eq(summing)]
        with m.If(summing):
            m.d.sync += [remaining.eq(steps), shift2.eq(shift1)]
            if self._rounding == "both":
                m.d.sync += single2.eq(single1)
            if self._rounding != "double":
                m.d.sync += even2.eq(even1)
        with m.Elif(remaining != 0):
            m.d.sync += remaining.eq(remaining - 1)
        last = remaining == 1
        # The terms of the bits in a_rest's low k, summed for the next step: each digit's
        # term at its weight with its +1 but the first digit's, the step's carry-in.
        bits = Cat(below, a_rest[0:k])   # bits[i + 1] is a_rest[i]
        terms = None
        first_negative = None
        for at in range(0, k, 2):
            if at + 1 < k:   # a radix-4 digit: bits[at] + bits[at + 1] − 2·bits[at + 2]
                low_bit, middle, high_bit = bits[at], bits[at + 1], bits[at + 2]
                one = low_bit ^ middle
                two = (high_bit ^ low_bit) & (high_bit ^ middle)
                magnitude = Mux(two, b << 1, Mux(one, b, 0))
            else:            # a last odd bit: bits[at] − bits[at + 1]
                low_bit, high_bit = bits[at], bits[at + 1]
                magnitude = Mux(low_bit ^ high_bit, b, 0)
            negative = high_bit
            term = Mux(negative, ~magnitude.as_signed(), magnitude.as_signed())
            if terms is None:
                terms, first_negative = term, negative
                continue
            # The sum's bits below this term's weight are the terms' before it. The sum
            # above is its own signal, so that yosys maps it to one carry chain with the
            # negation's +1 as its carry-in.
            upper = Signal(signed(width - at), name=f"terms{at // 2}", attrs={"keep": 1})
            m.d.comb += upper.eq(_add_with_carry(terms[at:].as_signed(), term, negative))
            terms = Cat(terms[0:at], upper).as_signed()
        step_terms = Signal(signed(width), reset_less=True)
        step_carry = Signal(reset_less=True)
        m.d.sync += [step_terms.eq(terms), step_carry.eq(first_negative)]
        # The step: the partial sum stays within ±2**31; with the terms it fits width bits.
        partial = Signal(signed(33), reset_less=True)
        low = Signal(a_bits, reset_less=True)   # the product's bits below the partial sum
        step_sum = Signal(signed(width), attrs={"keep": 1})
        m.d.comb += step_sum.eq(_add_with_carry(Mux(first, 0, partial), step_terms, step_carry))
        with m.If(remaining != 0):
            m.d.sync += [partial.eq(step_sum >> k), low.eq(Cat(low[k:], step_sum[0:k]))]
        # a == b == −2**31 (double rounding saturates): only with a 32-bit a, decided
        # while the first terms are summed and kept from the first step.
        overflow = Signal(reset_less=True)
        if self._acc_width == 32:
            overflow_next = Signal(reset_less=True)
            with m.If(summing):
                m.d.sync += overflow_next.eq((a_rest == int32_min) & (b == int32_min))
            with m.If(first):
                m.d.sync += overflow.eq(overflow_next)
        # The fields beside the product, from the last step's cycle.
        shift3 = Signal(SHIFT_BITS, reset_less=True)
        single3, even3 = Signal(reset_less=True), Signal(reset_less=True)
        valid3 = Signal()
        m.d.sync += valid3.eq(last)
        with m.If(last):
            m.d.sync += shift3.eq(shift2)
            if self._rounding == "both":
                m.d.sync += single3.eq(single2)
            if self._rounding != "double":
                m.d.sync += even3.eq(even2)
        full = Signal(signed(64))
        m.d.comb += full.eq(Cat(low, partial).as_signed())
        return full, overflow, shift3, valid3, single3, even3
