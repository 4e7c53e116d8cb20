"""GEMM expansion: a GEMM instruction stands for a LOADW and a MATMUL per K tile, the
steps the sequencer dispatches one at a time (:class:`npugen.golden.GemmState` is the
reference). Holds the SETGEMM registers and the weight pointer; the K tiles' activation
words come from its walk (``tap_walk.py``: one ``tile_step`` apart, or with the
feature-map hardware SETKERN's kernel taps).
"""

from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig, check_config_type
from ..isa import INSTRUCTION_WIDTH, OPCODE_WIDTH, Opcode
from .instruction import instruction_field
from .tap_walk import tap_walk

__all__ = ["GemmExpander"]


class GemmExpander(wiring.Component):
    """The step the instruction register ``instruction`` stands for: itself, or inside a
    GEMM (``is_gemm``) the next K tile's LOADW or MATMUL, with their fields (``op``,
    ``bank``, ``weight_addr``, ``act_addr``, ``acc_addr``, ``count``, ``accumulate``,
    ``combine``; ``bank`` always 0 with ``weight_banks`` 1). A GEMM with no K tiles
    stands for itself (``op`` GEMM: illegal).
    ``is_loadw`` and ``is_matmul`` are the step's kind from the decoded flags
    ``op_loadw``, ``op_matmul``; ``advance`` says the step completes its instruction;
    ``empty``: the instruction is a GEMM with no K tiles.

    With ``paired_loads``: ``pairable`` says the step is a MATMUL with a K tile after it,
    whose LOADW (``pair_bank``, ``pair_weight_addr``) may dispatch beside it (``pair``
    with ``dispatch``); the next step is then that K tile's MATMUL.

    With ``depthwise_tap_row`` and SETGEMM's ``tap_row``, each K tile's LOADW is two: the
    tile after its weights first (its row for the tap row), then its own, both into the
    K tile's bank; the pointer moves two tiles a K tile and no LOADW pairs.

    ``dispatch`` moves to the next step when the step is a GEMM's; ``set_gemm`` and
    ``set_kern`` load SETGEMM and SETKERN; ``run_start`` restores the walk's start and
    SETKERN's defaults.
    """

    def __init__(self, config: NpuConfig):
        self._config = check_config_type(config)
        super().__init__({
            "instruction": In(INSTRUCTION_WIDTH),
            "is_gemm": In(1),
            "op_loadw": In(1),
            "op_matmul": In(1),
            "dispatch": In(1),
            "set_gemm": In(1),
            "set_kern": In(1),
            "run_start": In(1),
            "op": Out(OPCODE_WIDTH),
            "is_loadw": Out(1),
            "is_matmul": Out(1),
            "advance": Out(1),
            "empty": Out(1),
            "bank": Out(1),
            "weight_addr": Out(16),
            "act_addr": Out(16),
            "acc_addr": Out(16),
            "count": Out(16),
            "accumulate": Out(1),
            "combine": Out(1),
            **({"pair": In(1), "pairable": Out(1), "pair_bank": Out(1),
                "pair_weight_addr": Out(16)} if config.paired_loads else {}),
        })

    def elaborate(self, platform):
        c = self._config
        m = Module()
        rows = c.rows
        instruction, is_gemm = self.instruction, self.is_gemm
        # The K tiles' activation words: SETKERN's kernel walk with the feature-map
        # hardware, else one tile_step apart.
        m.submodules.walk = walk = tap_walk(c.feature_maps)

        def field(opcode, name):
            return instruction_field(instruction, opcode, name)

        gemm_weight = Signal(16)      # SETGEMM weight pointer (advances after each GEMM)
        gemm_penult_kt = Signal(16)   # SETGEMM's k_tiles - 2: the K tile before the last
        gemm_empty = Signal(init=1)   # SETGEMM's k_tiles == 0 (no SETGEMM yet: 0 tiles)
        gemm_tile_step = Signal(16)
        gemm_started = Signal()
        gemm_matmul_next = Signal()   # 0: the K tile's LOADW is next, 1: its MATMUL
        gemm_kt = Signal(16)
        gemm_weight_run = Signal(16)
        gemm_weight_now = Mux(gemm_started, gemm_weight_run, gemm_weight)
        # Whether gemm_kt is the last K tile, and whether SETGEMM's k_tiles is 1, kept in
        # registers: the instruction's advance then takes no compare into the dispatch
        # decision's fetch enable.
        gemm_last_tile = Signal(init=1)
        gemm_single = Signal(init=1)
        gemm_last = Signal()
        # SETGEMM's tap_row (depthwise_tap_row): the K tile's second tile loads first.
        gemm_tap = Signal()
        gemm_tap_next = Signal()   # the K tile's next step is the second tile's LOADW
        tile_words = Mux(gemm_tap, 2 * rows, rows)
        m.d.comb += gemm_last.eq(gemm_matmul_next & gemm_last_tile)
        gemm_dispatch = self.dispatch & is_gemm
        m.d.comb += [
            walk.gemm_act_addr.eq(field(Opcode.GEMM, "act_addr")),
            walk.tile_step.eq(gemm_tile_step), walk.started.eq(gemm_started),
            walk.step.eq(gemm_dispatch), walk.matmul.eq(gemm_matmul_next),
            walk.last.eq(gemm_last),
            walk.instruction.eq(instruction), walk.set_kern.eq(self.set_kern),
            walk.run_start.eq(self.run_start),
        ]

        # One weight register per PE: every step uses bank 0 (``bank`` is left undriven, a
        # constant; Icarus hung on a run with an override after the If, or a Mux of its own).
        two_banks = c.weight_banks == 2
        with m.If(is_gemm):
            if two_banks:
                m.d.comb += self.bank.eq(field(Opcode.GEMM, "bank") ^ gemm_kt[0])
            m.d.comb += [
                self.op.eq(Mux(gemm_matmul_next, Opcode.MATMUL, Opcode.LOADW)),
                self.weight_addr.eq(gemm_weight_now + Mux(gemm_tap_next, rows, 0)),
                self.act_addr.eq(walk.act_addr),
                self.acc_addr.eq(field(Opcode.GEMM, "acc_addr")),
                self.count.eq(field(Opcode.GEMM, "count")),
                self.accumulate.eq(field(Opcode.GEMM, "accumulate") | (gemm_kt != 0)),
                self.combine.eq(field(Opcode.GEMM, "combine")),
            ]
            with m.If(gemm_empty):  # nothing to expand: stop as illegal
                m.d.comb += self.op.eq(Opcode.GEMM)
        with m.Else():
            if two_banks:
                m.d.comb += self.bank.eq(field(Opcode.LOADW, "bank"))
            m.d.comb += [
                self.op.eq(instruction[0:OPCODE_WIDTH]),
                self.weight_addr.eq(field(Opcode.LOADW, "weight_addr")),
                self.act_addr.eq(field(Opcode.MATMUL, "act_addr")),
                self.acc_addr.eq(field(Opcode.MATMUL, "acc_addr")),
                self.count.eq(field(Opcode.MATMUL, "count")),
                self.accumulate.eq(field(Opcode.MATMUL, "accumulate")),
                self.combine.eq(field(Opcode.MATMUL, "combine")),
            ]
        m.d.comb += [self.advance.eq(~is_gemm | gemm_last | gemm_empty),
                     self.empty.eq(is_gemm & gemm_empty)]
        # The step's kind from the decoded flags (op spelt out): a GEMM stands for its
        # LOADW or MATMUL, or for nothing (illegal) when it has no K tiles.
        gemm_step = is_gemm & ~gemm_empty
        m.d.comb += [
            self.is_loadw.eq(Mux(is_gemm, gemm_step & ~gemm_matmul_next, self.op_loadw)),
            self.is_matmul.eq(Mux(is_gemm, gemm_step & gemm_matmul_next, self.op_matmul)),
        ]

        if c.paired_loads:
            m.d.comb += [
                self.pairable.eq(is_gemm & ~gemm_empty & gemm_matmul_next & ~gemm_last_tile
                                 & ~gemm_tap),
                self.pair_bank.eq(~self.bank),
                self.pair_weight_addr.eq(gemm_weight_now + rows),
            ]
        with m.If(gemm_dispatch):
            with m.If(~gemm_matmul_next):
                m.d.sync += [gemm_matmul_next.eq(~gemm_tap_next), gemm_tap_next.eq(0),
                             gemm_started.eq(1), gemm_weight_run.eq(gemm_weight_now)]
            with m.Else():
                m.d.sync += [
                    gemm_matmul_next.eq(0), gemm_kt.eq(gemm_kt + 1), gemm_tap_next.eq(gemm_tap),
                    gemm_last_tile.eq(gemm_kt == gemm_penult_kt),
                    gemm_weight_run.eq(gemm_weight_now + tile_words),
                ]
                if c.paired_loads:   # the next K tile's LOADW went with it
                    with m.If(self.pair):
                        m.d.sync += gemm_matmul_next.eq(1)
                with m.If(gemm_last):
                    m.d.sync += [gemm_started.eq(0), gemm_kt.eq(0),
                                 gemm_last_tile.eq(gemm_single),
                                 gemm_weight.eq(gemm_weight_now + tile_words)]
        with m.If(self.set_gemm):
            m.d.sync += [
                gemm_weight.eq(field(Opcode.SETGEMM, "weight_addr")),
                gemm_penult_kt.eq(field(Opcode.SETGEMM, "k_tiles") - 2),
                gemm_empty.eq(field(Opcode.SETGEMM, "k_tiles") == 0),
                # SETGEMM waits for the GEMM before it: gemm_kt is 0 here.
                gemm_single.eq(field(Opcode.SETGEMM, "k_tiles") == 1),
                gemm_last_tile.eq(field(Opcode.SETGEMM, "k_tiles") == 1),
                gemm_tile_step.eq(field(Opcode.SETGEMM, "tile_step")),
            ]
            if c.depthwise_tap_row:
                m.d.sync += [gemm_tap.eq(field(Opcode.SETGEMM, "tap_row")),
                             gemm_tap_next.eq(field(Opcode.SETGEMM, "tap_row"))]
        with m.If(self.run_start):
            m.d.sync += [gemm_started.eq(0), gemm_matmul_next.eq(0), gemm_kt.eq(0),
                         gemm_last_tile.eq(gemm_single)]
            if c.depthwise_tap_row:   # as the golden model's GemmState starts
                m.d.sync += [gemm_tap.eq(0), gemm_tap_next.eq(0)]
        return m
