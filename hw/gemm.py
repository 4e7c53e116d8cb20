"""GEMM expansion: a GEMM instruction stands for a LOADW and a MATMUL per K tile, the
steps the sequencer dispatches one at a time (:class:`npugen.golden.GemmState` is the
reference). Holds the SETGEMM and (feature-map builds) SETKERN registers and the K-tile
walk: weight pointer, and the activation word of the tile's kernel tap, of its kernel row
and of its channel tile.
"""

from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig
from ..isa import INSTRUCTION_WIDTH, OPCODE_WIDTH, Opcode
from .instruction import instruction_field

__all__ = ["GemmExpander"]


class GemmExpander(wiring.Component):
    """The step the instruction register ``instruction`` stands for: itself, or inside a
    GEMM (``is_gemm``) the next K tile's LOADW or MATMUL, with their fields (``op``,
    ``bank``, ``weight_addr``, ``act_addr``, ``acc_addr``, ``count``, ``accumulate``,
    ``combine``). A GEMM with no K tiles stands for itself (``op`` GEMM: illegal).
    ``is_loadw`` and ``is_matmul`` are the step's kind from the decoded flags
    ``op_loadw``, ``op_matmul``; ``advance`` says the step completes its instruction.

    ``dispatch`` moves to the next step when the step is a GEMM's; ``set_gemm`` and
    ``set_kern`` load SETGEMM and SETKERN; ``run_start`` restores the walk's start and
    SETKERN's defaults.
    """

    def __init__(self, config: NpuConfig):
        if not isinstance(config, NpuConfig):
            raise TypeError(f"config must be an NpuConfig, not {config!r}")
        self._config = config
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
            "bank": Out(1),
            "weight_addr": Out(16),
            "act_addr": Out(16),
            "acc_addr": Out(16),
            "count": Out(16),
            "accumulate": Out(1),
            "combine": Out(1),
        })

    def elaborate(self, platform):
        c = self._config
        m = Module()
        rows, fm = c.rows, c.feature_maps
        instruction, is_gemm = self.instruction, self.is_gemm

        def field(opcode, name):
            return instruction_field(instruction, opcode, name)

        gemm_weight = Signal(16)      # SETGEMM weight pointer (advances after each GEMM)
        gemm_last_kt = Signal(16)     # SETGEMM's k_tiles - 1, kept ready for the compare
        gemm_empty = Signal(init=1)   # SETGEMM's k_tiles == 0 (no SETGEMM yet: 0 tiles)
        gemm_tile_step = Signal(16)
        kernel_last_x = Signal(8)
        kernel_last_y = Signal(8)
        kernel_row_step = Signal(16)
        gemm_started = Signal()
        gemm_matmul_next = Signal()   # 0: the K tile's LOADW is next, 1: its MATMUL
        gemm_kt = Signal(16)
        gemm_weight_run = Signal(16)
        # The K-tile walk: tap x, y; the activation word of the tap, of its kernel row
        # and of its channel tile.
        gemm_x = Signal(8)
        gemm_y = Signal(8)
        gemm_tap_run = Signal(16)
        gemm_row_run = Signal(16)
        gemm_tile_run = Signal(16)
        gemm_weight_now = Mux(gemm_started, gemm_weight_run, gemm_weight)
        gemm_act_field = field(Opcode.GEMM, "act_addr")
        gemm_act_now = Mux(gemm_started, gemm_tap_run, gemm_act_field)
        gemm_row_now = Mux(gemm_started, gemm_row_run, gemm_act_field)
        gemm_tile_now = Mux(gemm_started, gemm_tile_run, gemm_act_field)
        gemm_last = Signal()
        m.d.comb += gemm_last.eq(gemm_matmul_next & (gemm_kt == gemm_last_kt))

        with m.If(is_gemm):
            m.d.comb += [
                self.op.eq(Mux(gemm_matmul_next, Opcode.MATMUL, Opcode.LOADW)),
                self.bank.eq(field(Opcode.GEMM, "bank") ^ gemm_kt[0]),
                self.weight_addr.eq(gemm_weight_now),
                self.act_addr.eq(gemm_act_now),
                self.acc_addr.eq(field(Opcode.GEMM, "acc_addr")),
                self.count.eq(field(Opcode.GEMM, "count")),
                self.accumulate.eq(field(Opcode.GEMM, "accumulate") | (gemm_kt != 0)),
                self.combine.eq(field(Opcode.GEMM, "combine")),
            ]
            with m.If(gemm_empty):  # nothing to expand: stop as illegal
                m.d.comb += self.op.eq(Opcode.GEMM)
        with m.Else():
            m.d.comb += [
                self.op.eq(instruction[0:OPCODE_WIDTH]),
                self.bank.eq(field(Opcode.LOADW, "bank")),
                self.weight_addr.eq(field(Opcode.LOADW, "weight_addr")),
                self.act_addr.eq(field(Opcode.MATMUL, "act_addr")),
                self.acc_addr.eq(field(Opcode.MATMUL, "acc_addr")),
                self.count.eq(field(Opcode.MATMUL, "count")),
                self.accumulate.eq(field(Opcode.MATMUL, "accumulate")),
                self.combine.eq(field(Opcode.MATMUL, "combine")),
            ]
        m.d.comb += self.advance.eq(~is_gemm | gemm_last | gemm_empty)
        # The step's kind from the decoded flags (op spelt out): a GEMM stands for its
        # LOADW or MATMUL, or for nothing (illegal) when it has no K tiles.
        gemm_step = is_gemm & ~gemm_empty
        m.d.comb += [
            self.is_loadw.eq(Mux(is_gemm, gemm_step & ~gemm_matmul_next, self.op_loadw)),
            self.is_matmul.eq(Mux(is_gemm, gemm_step & gemm_matmul_next, self.op_matmul)),
        ]

        with m.If(self.dispatch & is_gemm):
            with m.If(~gemm_matmul_next):
                m.d.sync += [gemm_matmul_next.eq(1), gemm_started.eq(1),
                             gemm_weight_run.eq(gemm_weight_now), gemm_tap_run.eq(gemm_act_now),
                             gemm_row_run.eq(gemm_row_now), gemm_tile_run.eq(gemm_tile_now)]
            with m.Else():
                m.d.sync += [
                    gemm_matmul_next.eq(0), gemm_kt.eq(gemm_kt + 1),
                    gemm_weight_run.eq(gemm_weight_now + rows),
                ]
                # Next tap: along the kernel row, else the next kernel row, else the
                # next channel tile.
                if fm:
                    with m.If(gemm_x != kernel_last_x):
                        m.d.sync += [gemm_x.eq(gemm_x + 1),
                                     gemm_tap_run.eq(gemm_act_now + 1)]
                    with m.Elif(gemm_y != kernel_last_y):
                        next_row = gemm_row_now + kernel_row_step
                        m.d.sync += [gemm_x.eq(0), gemm_y.eq(gemm_y + 1),
                                     gemm_row_run.eq(next_row), gemm_tap_run.eq(next_row)]
                    with m.Else():
                        next_tile = gemm_tile_now + gemm_tile_step
                        m.d.sync += [gemm_x.eq(0), gemm_y.eq(0), gemm_tile_run.eq(next_tile),
                                     gemm_row_run.eq(next_tile), gemm_tap_run.eq(next_tile)]
                else:
                    m.d.sync += gemm_tap_run.eq(gemm_act_now + gemm_tile_step)
                with m.If(gemm_last):
                    m.d.sync += [gemm_started.eq(0), gemm_kt.eq(0), gemm_x.eq(0),
                                 gemm_y.eq(0), gemm_weight.eq(gemm_weight_now + rows)]
        with m.If(self.set_gemm):
            m.d.sync += [
                gemm_weight.eq(field(Opcode.SETGEMM, "weight_addr")),
                gemm_last_kt.eq(field(Opcode.SETGEMM, "k_tiles") - 1),
                gemm_empty.eq(field(Opcode.SETGEMM, "k_tiles") == 0),
                gemm_tile_step.eq(field(Opcode.SETGEMM, "tile_step")),
            ]
        if fm:
            with m.If(self.set_kern):
                m.d.sync += [
                    kernel_last_x.eq(field(Opcode.SETKERN, "kernel_w") - 1),
                    kernel_last_y.eq(field(Opcode.SETKERN, "kernel_h") - 1),
                    kernel_row_step.eq(field(Opcode.SETKERN, "kernel_row_step")),
                ]
        with m.If(self.run_start):
            m.d.sync += [gemm_started.eq(0), gemm_matmul_next.eq(0), gemm_kt.eq(0),
                         gemm_x.eq(0), gemm_y.eq(0)]
            if fm:   # SETKERN starts from its defaults in every run
                m.d.sync += [kernel_last_x.eq(0), kernel_last_y.eq(0), kernel_row_step.eq(0)]
        return m
