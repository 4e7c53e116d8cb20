"""A weight-stationary processing element with a double-buffered (or single) weight register."""

from amaranth import Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .dsp import fabric_product, registered_product
from .implementation import GENERIC, Implementation, check_implementation

__all__ = ["ProcessingElement"]


class ProcessingElement(wiring.Component):
    """One multiply-accumulate cell of the systolic array.

    Each cycle: ``product <= act_in * weight[bank_in]``, ``psum_out <= psum_in + product``
    (the product of the previous cycle's activation) and the activation
    (with its bank bit) moves right one cell.

    Its registers are reset-less: everything in them is data, which a new weight tile or
    the words behind replace (the feeder, the loader and the accumulate path, which say
    when a word or a sum counts, are reset). A reset line to every PE's flip-flops is a
    net of ten thousand loads on a 12×12, and flip-flops with and without a reset cannot
    share an ECP5 slice. Weights shift down the column into bank
    ``load_bank`` while ``load`` is high; the other bank keeps computing, so the next
    weight tile loads under the current one. With ``banks=1`` there is one weight register:
    the bank bits are ignored (the sequencer then sends bank 0 only, and a tile loads
    only once the rows using the last one have passed).

    ``psum_width``: the partial sums it takes and passes on; a sum that does not fit wraps,
    as the accumulators do (the array gives each row what its sums can reach).

    ``shared_multiplier``: the PE multiplies outside itself. It presents its operands on
    ``mul_act`` and ``mul_weight`` and takes their product, registered one cycle, on
    ``product``; the array packs such PEs two per DSP block (hw/dsp.py).

    ``fabric_multiplier``: the product is built in logic (``fabric_product``), never in a
    DSP block, for the rows past the implementation's DSP budget (hw/dsp.py, ``dsp_rows``).

    ``implementation``: whose DSP block multiplies otherwise (hw/dsp.py,
    ``registered_product``).

    ``weight_in_multiplier`` (with ``shared_multiplier`` and one bank): the weight
    register is the shared multiplier's (an iCE40 SB_MAC16's B input register):
    ``mul_weight`` is ``weight_in`` and ``mul_load`` says when the multiplier takes it.

    ``depthwise``: the PE also passes activations down its column (``chain_in`` to
    ``chain_out``, two registers: half the partial sums' speed, so each row below sees the
    word before) and multiplies ``chain_in`` instead of ``act_in`` for the words whose
    ``mode_in`` (travelling right beside the bank bit) is high: the depthwise mode
    (hw/array.py).
    """

    def __init__(self, *, input_width: int, weight_width: int, psum_width: int,
                 shared_multiplier: bool = False, fabric_multiplier: bool = False,
                 depthwise: bool = False, banks: int = 2,
                 weight_in_multiplier: bool = False,
                 implementation: Implementation = GENERIC):
        if banks not in (1, 2):
            raise ValueError(f"banks must be 1 or 2, not {banks!r}")
        if weight_in_multiplier and not (shared_multiplier and banks == 1):
            raise ValueError("weight_in_multiplier needs shared_multiplier and banks=1")
        for name, value in (("input_width", input_width), ("weight_width", weight_width),
                            ("psum_width", psum_width)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if shared_multiplier and fabric_multiplier:
            raise ValueError("a PE multiplies either outside itself (shared_multiplier) or in "
                             "logic (fabric_multiplier), not both")
        self._implementation = check_implementation(implementation)
        members = {
            "act_in": In(signed(input_width)),
            "bank_in": In(1),
            "psum_in": In(signed(psum_width)),
            "act_out": Out(signed(input_width)),
            "bank_out": Out(1),
            "psum_out": Out(signed(psum_width)),
            "weight_in": In(signed(weight_width)),
            "weight_out": Out(signed(weight_width)),
            "load": In(1),
            "load_bank": In(1),
        }
        if depthwise:
            members |= {"chain_in": In(signed(input_width)), "chain_out": Out(signed(input_width)),
                        "mode_in": In(1), "mode_out": Out(1)}
        if shared_multiplier:
            members |= {"mul_act": Out(signed(input_width)),
                        "mul_weight": Out(signed(weight_width)),
                        "product": In(signed(input_width + weight_width))}
        if weight_in_multiplier:
            members |= {"mul_load": Out(1)}
        super().__init__(members)
        self._weight_width = weight_width
        self._shared_multiplier = shared_multiplier
        self._fabric_multiplier = fabric_multiplier
        self._depthwise = depthwise
        self._banks = banks
        self._weight_in_multiplier = weight_in_multiplier

    def elaborate(self, platform):
        m = Module()
        weight = [Signal(signed(self._weight_width), name=f"weight{b}", reset_less=True)
                  for b in range(self._banks)]
        if self._weight_in_multiplier:   # the multiplier holds it
            m.d.comb += [self.weight_out.eq(self.weight_in), self.mul_load.eq(self.load)]
            operand = self.weight_in
        elif self._banks == 1:
            m.d.comb += self.weight_out.eq(weight[0])
            with m.If(self.load):
                m.d.sync += weight[0].eq(self.weight_in)
            operand = weight[0]
        else:
            m.d.comb += self.weight_out.eq(Mux(self.load_bank, weight[1], weight[0]))
            with m.If(self.load):
                with m.If(self.load_bank):
                    m.d.sync += weight[1].eq(self.weight_in)
                with m.Else():
                    m.d.sync += weight[0].eq(self.weight_in)
            operand = Mux(self.bank_in, weight[1], weight[0])
        # The product is registered (PRODUCT_PIPELINE_STAGES); every PE has the same
        # delay, so the partial sums of a column stay aligned. On ECP5 the register is
        # the DSP block's input register (hw/dsp.py). With a shared multiplier the operands
        # leave the PE and the array returns their registered product (two PEs per iCE40
        # DSP block).
        act = self.act_in
        if self._depthwise:
            act = Mux(self.mode_in, self.chain_in, self.act_in)
            chain_mid = Signal.like(self.chain_in, name="chain_mid", reset_less=True)
            chain_out, mode_out = _registers(m, self.chain_out, self.mode_out,
                                             names=("chain", "mode"))
            m.d.sync += [chain_mid.eq(self.chain_in), chain_out.eq(chain_mid),
                         mode_out.eq(self.mode_in)]
        if self._shared_multiplier:
            m.d.comb += [self.mul_act.eq(act), self.mul_weight.eq(operand)]
            product = self.product
        elif self._fabric_multiplier:
            product = Signal(signed(len(self.act_in) + len(operand)), name="product",
                             reset_less=True)
            m.d.sync += product.eq(fabric_product(act, operand))
        else:
            product = registered_product(m, self._implementation, act, operand,
                                         name="product")
        # Assigning to the narrower psum_out wraps, like the golden model.
        psum_out, act_out, bank_out = _registers(
            m, self.psum_out, self.act_out, self.bank_out, names=("psum", "act", "bank"))
        m.d.sync += [
            psum_out.eq(self.psum_in + product),
            act_out.eq(self.act_in),
            bank_out.eq(self.bank_in),
        ]
        return m


def _registers(m: Module, *outputs: Signal, names: tuple[str, ...]) -> list[Signal]:
    """A reset-less register driving each of ``outputs`` (component ports, which
    cannot be reset-less themselves)."""
    registers = []
    for output, name in zip(outputs, names, strict=True):
        register = Signal.like(output, name=f"{name}_reg", reset_less=True)
        m.d.comb += output.eq(register)
        registers.append(register)
    return registers
