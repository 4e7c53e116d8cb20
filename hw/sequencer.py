"""The sequencer: fetches the program, dispatches at most one step a cycle, in order, when
the units the step needs are free (the issue rules of ``sw/timing.py``, which the cycle
model :class:`npugen.golden.CycleModel` counts with), and runs, stops and aborts the run.

Fetch (the cycle model's ``next_cycle = 2``): the instruction register holds the
instruction at ``pc``; the memory's output holds the next one (read ahead), so decoding
starts from a register and the memory's slow clock-to-output stays off the dispatch
path. A run's cycle 0 reads the first instruction, cycle 1 loads it, cycle 2 may
dispatch it.
"""

from amaranth import Array, Cat, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig, check_config_type
from ..isa import INSTRUCTION_WIDTH, OPCODE_WIDTH, REQUANT_OVERLAPPERS, Opcode
from .gemm import GemmExpander
from .instruction import instruction_field

__all__ = ["Sequencer", "STEP_FIELDS"]

#: The fields of a LOADW or MATMUL step, as the sequencer gives them to the units.
STEP_FIELDS = {"bank": 1, "weight_addr": 16, "act_addr": 16, "acc_addr": 16, "count": 16,
               "accumulate": 1, "combine": 1}

#: The strobes the sequencer raises in the cycle it dispatches each kind of step.
_STROBES = {Opcode.LOADW: "loadw", Opcode.MATMUL: "matmul", Opcode.REQUANT: "requant",
            Opcode.SETPP: "set_pp", Opcode.SETREQ: "set_req", Opcode.SETOUT: "set_out",
            Opcode.SETWIN: "set_win", Opcode.FILL: "fill", Opcode.TABLE: "table",
            Opcode.RESCALE: "rescale"}


def _overlaps(config: NpuConfig) -> bool:
    """Whether REQUANT_OVERLAPPERS may dispatch while the requantizer's write port is
    busy: after a REQUANT with ``overlap`` (``requant_overlap``) or a FILL (the
    feature-map hardware, unless ``single_port_activations``)."""
    return config.requant_overlap or (config.feature_maps
                                      and not config.single_port_activations)


class Sequencer(wiring.Component):
    """Runs from ``start_pc`` from the cycle ``start`` is high until HALT (``done``), an
    illegal instruction (``illegal``) or ``abort`` (``aborted``). ``fetch_addr`` and
    ``fetch_en`` drive the instruction memory's read port during a run; ``fetch_data`` is
    its output.

    The units' state the issue rules read: ``load_busy``, ``load_ready``, ``load_filling``
    and ``loading_bank`` (weight loader), ``feed_busy``, ``feed_ready``, ``feeding_bank``,
    ``inflight_idle`` (per bank) and ``drain_idle`` (feeder), ``requant_active`` and
    ``requant_overlap`` (the active REQUANT or FILL lets ``REQUANT_OVERLAPPERS``
    dispatch), ``rescale_active`` (a RESCALE holds every step) and ``table_active`` (a
    TABLE holds RESCALE; it takes the requantizer's parameter port). In the cycle a
    step dispatches, its strobe (``loadw``, ``matmul``, ``requant``, ``set_pp``,
    ``set_req``, ``set_out``, ``set_win``, ``fill``, ``table``, ``rescale``) is high, with
    ``instruction`` and the step's fields (``STEP_FIELDS``). ``stall`` is high in the
    cycles an instruction is ready but may not dispatch.
    """

    def __init__(self, config: NpuConfig):
        self._config = check_config_type(config)
        depth = config.instruction_depth
        super().__init__({
            "start": In(1), "abort": In(1), "start_pc": In(range(depth)),
            "fetch_addr": Out(range(depth)), "fetch_en": Out(1),
            "fetch_data": In(INSTRUCTION_WIDTH),
            "load_busy": In(1), "load_ready": In(1), "load_filling": In(1),
            "loading_bank": In(1),
            "feed_busy": In(1), "feed_ready": In(1), "feeding_bank": In(1),
            "inflight_idle": In(2), "drain_idle": In(1), "requant_active": In(1),
            "requant_overlap": In(1), "rescale_active": In(1), "table_active": In(1),
            "running": Out(1), "done": Out(1), "aborted": Out(1), "illegal": Out(1),
            "pc": Out(range(depth)), "stall": Out(1),
            "instruction": Out(INSTRUCTION_WIDTH),
            **{name: Out(width) for name, width in STEP_FIELDS.items()},
            **{name: Out(1) for name in _STROBES.values()},
            # The weight loader's bank and address: the step's, or in a paired dispatch
            # the next K tile's.
            **({"load_bank": Out(1), "load_weight_addr": Out(16)}
               if config.paired_loads else {}),
        })

    def elaborate(self, platform):
        c = self._config
        m = Module()
        running, instruction = self.running, self.instruction
        m.submodules.gemm = gemm = GemmExpander(c)
        fill = Signal(range(3))       # 0: read the first instruction, 1: it arrives, 2: ready
        ready = fill[1]
        fetch_addr = Signal(range(c.instruction_depth))
        # The opcodes the dispatch decision tells apart, decoded when the instruction is
        # loaded (below) and kept in registers beside it: the decision, the sequencer's
        # longest path, then starts from them rather than from a compare.
        # With single_port_activations a FILL waits for the feeder's last read.
        fill_waits = c.feature_maps and c.single_port_activations
        # The strobed ones too: each strobe is the dispatch and a flag.
        strobed_ops = (Opcode.SETPP, Opcode.SETREQ, Opcode.SETGEMM,
                       *((Opcode.SETKERN, Opcode.SETWIN, Opcode.SETOUT, Opcode.FILL)
                         if c.feature_maps else ()))
        decoded_ops = (Opcode.GEMM, Opcode.LOADW, Opcode.MATMUL, Opcode.REQUANT, Opcode.HALT,
                       *((Opcode.RESCALE, Opcode.TABLE) if c.rescale_tables else ()),
                       *strobed_ops)
        op_is = {op: Signal(init=int(op == 0), name=f"op_is_{op.name.lower()}")
                 for op in decoded_ops}
        # Whether the instruction's opcode is none this NPU runs (then it stops as illegal,
        # as does a GEMM with no K tiles), decoded the same way: HALT and an illegal step
        # stop the run with flags, not a decode, after the dispatch decision.
        # (The feature-map instructions stop as illegal in NPUs built without them.)
        legal_ops = decoded_ops
        op_unknown = Signal()
        # Whether the instruction may dispatch beside a REQUANT with overlap, decoded the
        # same way.
        may_overlap = Signal()
        # With requant_overlap a REQUANT but to_acc dispatches beside the feeder's stream
        # and its drain (the requantization unit waits for them: drain_wait), likewise.
        requant_beside_feed = Signal()
        m.d.comb += [gemm.instruction.eq(instruction), gemm.is_gemm.eq(op_is[Opcode.GEMM]),
                     gemm.op_loadw.eq(op_is[Opcode.LOADW]),
                     gemm.op_matmul.eq(op_is[Opcode.MATMUL]), gemm.run_start.eq(self.start),
                     *[getattr(self, name).eq(getattr(gemm, name)) for name in STEP_FIELDS]]

        # The issue rules (sw/timing.py).
        step_is_loadw, step_is_matmul = gemm.is_loadw, gemm.is_matmul
        step_is_requant, step_is_halt = op_is[Opcode.REQUANT], op_is[Opcode.HALT]
        step_bank = gemm.bank
        load_active, feed_busy = self.load_busy, self.feed_busy
        inflight_idle = Array(self.inflight_idle[b] for b in range(2))
        step_is_fill = op_is[Opcode.FILL] if fill_waits else 0
        # A RESCALE takes the accumulate path: it waits for the array's results.
        step_is_rescale = op_is[Opcode.RESCALE] if c.rescale_tables else 0
        step_is_table = op_is[Opcode.TABLE] if c.rescale_tables else 0
        step_waits = (step_is_loadw | step_is_matmul | step_is_requant | step_is_halt
                      | step_is_fill | step_is_rescale | step_is_table)
        # Whether each kind of step may dispatch (its issue rule), and the dispatch of each:
        # the flags are one-hot, so each strobe is the shared `base` and its own rule alone,
        # rather than the whole decision and a flag (shorter paths into the units).
        # A LOADW waits for the feeder to leave its bank; with paired_loads (a word's bank
        # free the cycle it issues) it may go with the feeder's last word.
        feeder_on = feed_busy & ~self.feed_ready if c.paired_loads else feed_busy
        may_loadw = (step_is_loadw & self.load_ready & inflight_idle[step_bank]
                     & ~(feeder_on & (self.feeding_bank == step_bank)))
        may_matmul = (step_is_matmul & self.feed_ready
                      & ~(self.load_filling & (self.loading_bank == step_bank)))
        may_requant = step_is_requant & (requant_beside_feed | (~feed_busy & self.drain_idle))
        may_halt = step_is_halt & ~feed_busy & self.drain_idle & ~load_active
        may_fill = step_is_fill & ~feed_busy
        may_rescale = step_is_rescale & ~feed_busy & self.drain_idle & ~self.table_active
        # A TABLE may go beside a REQUANT or FILL (it starts when they are done), not beside
        # another TABLE.
        may_table = step_is_table & ~self.table_active
        base = Signal()
        requant_free = ~self.requant_active
        if _overlaps(c):
            requant_free = requant_free | (self.requant_overlap & may_overlap)
        if c.rescale_tables:
            requant_free = requant_free & ~self.rescale_active
        m.d.comb += base.eq(running & ready & requant_free)
        dispatch = Signal()
        m.d.comb += dispatch.eq(base & (may_loadw | may_matmul | may_requant | may_halt
                                        | may_fill | may_rescale | may_table | ~step_waits))
        advance = gemm.advance   # the step completes its instruction: the PC moves on
        loadw = base & may_loadw
        if c.paired_loads:
            # A GEMM's next K tile's LOADW beside its MATMUL, by the LOADW rule above for
            # the other bank as the units stand before the MATMUL (CycleModel._paired).
            # Of that rule only the loader's readiness is left: a word's bank is free the
            # cycle it issues (weight_use_cycles 0), so inflight_idle stays high, and the
            # MATMUL's own rule (feed_ready) leaves the feeder on its last word or idle.
            pair_bank = gemm.pair_bank
            pair = base & may_matmul & gemm.pairable & self.load_ready
            loadw = loadw | pair
            m.d.comb += [gemm.pair.eq(pair),
                         self.load_bank.eq(Mux(pair, pair_bank, step_bank)),
                         self.load_weight_addr.eq(Mux(pair, gemm.pair_weight_addr,
                                                      gemm.weight_addr))]
        m.d.comb += [self.stall.eq(ready & ~dispatch),
                     self.loadw.eq(loadw), self.matmul.eq(base & may_matmul),
                     self.requant.eq(base & may_requant),
                     # A GEMM's step, or a GEMM with no K tiles (it stops as illegal).
                     gemm.dispatch.eq(self.loadw | self.matmul | (base & gemm.empty))]

        # Fetch: the memory's port is the sequencer's during a run.
        m.d.comb += [self.fetch_addr.eq(fetch_addr),
                     self.fetch_en.eq(~ready | (dispatch & advance))]
        with m.If(running):
            with m.If(self.fetch_en):
                m.d.sync += fetch_addr.eq(fetch_addr + 1)
            with m.If((fill == 1) | (dispatch & advance)):
                m.d.sync += instruction.eq(self.fetch_data)
                m.d.sync += [flag.eq(self.fetch_data[0:OPCODE_WIDTH] == op)
                             for op, flag in op_is.items()]
                m.d.sync += op_unknown.eq(~Cat(*[self.fetch_data[0:OPCODE_WIDTH] == op
                                                 for op in legal_ops]).any())
                if c.requant_overlap:
                    m.d.sync += requant_beside_feed.eq(
                        (self.fetch_data[0:OPCODE_WIDTH] == Opcode.REQUANT)
                        & ~instruction_field(self.fetch_data, Opcode.REQUANT, "to_acc"))
                if _overlaps(c):
                    # Of the opcodes this NPU runs: another stops the run as illegal once
                    # the requantizer is done, not beside it.
                    m.d.sync += may_overlap.eq(
                        Cat(*[self.fetch_data[0:OPCODE_WIDTH] == op
                              for op in REQUANT_OVERLAPPERS if op in legal_ops]).any())
            with m.If(~ready):
                m.d.sync += fill.eq(fill + 1)
        with m.If(dispatch & advance):
            m.d.sync += self.pc.eq(self.pc + 1)

        with m.If(base & may_halt):
            m.d.sync += [running.eq(0), self.done.eq(1)]
        with m.If(base & (op_unknown | gemm.empty)):   # neither ever waits
            m.d.sync += [running.eq(0), self.illegal.eq(1)]
        strobes = {Opcode.SETPP: self.set_pp, Opcode.SETREQ: self.set_req,
                   Opcode.SETGEMM: gemm.set_gemm, Opcode.SETKERN: gemm.set_kern,
                   Opcode.SETWIN: self.set_win, Opcode.SETOUT: self.set_out,
                   Opcode.FILL: self.fill}
        m.d.comb += [strobes[op].eq(base & op_is[op]) for op in strobed_ops
                     if not (fill_waits and op == Opcode.FILL)]
        if fill_waits:
            m.d.comb += self.fill.eq(base & may_fill)
        if c.rescale_tables:
            m.d.comb += [self.rescale.eq(base & may_rescale), self.table.eq(base & may_table)]

        with m.If(self.start):
            m.d.sync += [running.eq(1), fill.eq(0), fetch_addr.eq(self.start_pc),
                         self.pc.eq(self.start_pc), self.done.eq(0), self.aborted.eq(0),
                         self.illegal.eq(0)]
        with m.If(self.abort):
            m.d.sync += [running.eq(0), self.aborted.eq(1)]
        return m
