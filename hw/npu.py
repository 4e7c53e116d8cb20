"""The NPU: its memories, the systolic array, the sequencer and the units around them,
connected.

Each unit but the sequencer is a component in its own file, with the issue rules it
keeps (the golden model's :class:`~npugen.golden.CycleModel` mirrors them cycle for
cycle, with the constants of ``sw/timing.py``):

- ``host_port.py``: the host bus, the memories' access outside a run, the registers;
  ``counters.py``: the performance counters and UPTIME;
- the sequencer (here) dispatches at most one step a cycle, in order, when the step's
  units are free, and expands a GEMM into LOADW/MATMUL steps;
- ``weight_loader.py`` (LOADW) shifts a tile into one bank while ``feeder.py`` (MATMUL)
  streams activations through the other, so preload is hidden;
- ``accumulate.py``: results leave the array ``array_latency`` cycles after entering it
  and are added into the accumulator memory (read-modify-write, forwarded for
  back-to-back rows);
- ``requant_unit.py`` (REQUANT) runs ``requant_lanes`` channels a cycle once the array
  has drained and blocks dispatch until its last write.

Each memory has one read and one write port: the host's accesses are their defaults, and
the units' requests (``ports.py``) are granted over them in a fixed order.
"""

from amaranth import Array, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig
from ..isa import INSTRUCTION_WIDTH, OPCODE_WIDTH, Opcode
from ..memory_map import Region, memories
from .accumulate import AccumulatePath
from .array import SystolicArray
from .counters import PerformanceCounters
from .feeder import Feeder
from .host_port import HostPort
from .hostbus import HostBus
from .instruction import instruction_field as _field
from .ports import grant_read, grant_write
from .ram import memory_ports
from .requant_unit import RequantUnit
from .weight_loader import WeightLoader

__all__ = ["Npu"]


class Npu(wiring.Component):
    """The whole NPU behind a 32-bit memory-mapped host port (see ``memory_map``).

    ``running`` is high during a run; ``done`` rises when a run reaches HALT.
    """

    host: In(HostBus())
    running: Out(1)
    done: Out(1)

    def __init__(self, config: NpuConfig):
        if not isinstance(config, NpuConfig):
            raise TypeError(f"config must be an NpuConfig, not {config!r}")
        self._config = config
        super().__init__()

    @property
    def config(self) -> NpuConfig:
        return self._config

    def elaborate(self, platform):
        c = self._config
        m = Module()
        infos = memories(c)

        # -- Memories -----------------------------------------------------------------
        reads, writes = {}, {}
        for region, info in infos.items():
            writes[region], reads[region] = memory_ports(
                m, platform, info, transparent=region is Region.ACCUMULATORS)

        m.submodules.array = array = SystolicArray(c)

        running = Signal()
        done = Signal()
        aborted = Signal()
        illegal = Signal()
        pc = Signal(range(c.instruction_depth))

        # -- Host port, registers, counters --------------------------------------------
        m.submodules.host_port = host_port = HostPort(c)
        m.submodules.counters = counters = PerformanceCounters(c)
        wiring.connect(m, wiring.flipped(self.host), host_port.host)
        start, abort, start_pc = host_port.start, host_port.abort, host_port.start_pc
        m.d.comb += [host_port.running.eq(running), host_port.done.eq(done),
                     host_port.aborted.eq(aborted), host_port.illegal.eq(illegal),
                     host_port.pc.eq(pc), host_port.counters.eq(counters.counters),
                     host_port.uptime.eq(counters.uptime), counters.clear.eq(start),
                     counters.running.eq(running)]
        # Seen from the host, a run begins with the write: no stale `done` in between.
        m.d.comb += [self.running.eq(running | start), self.done.eq(done & ~start)]
        # The host owns the memories' ports outside a run: its accesses are their defaults,
        # which the units' grants (below) override.
        for region, info in infos.items():
            access = getattr(host_port, info.name)
            m.d.comb += [reads[region].addr.eq(access.addr), writes[region].addr.eq(access.addr),
                         writes[region].data.eq(access.data), writes[region].en.eq(access.en),
                         access.read_data.eq(reads[region].data)]

        # -- Unit state ------------------------------------------------------------------
        rows = c.rows
        # The feature-map hardware (address walks, max combine, REQUANT to_acc) is left
        # out of NPUs generated without it; their SETKERN/SETWIN/SETOUT stop as illegal.
        fm = c.feature_maps
        # The instruction register holds the instruction at `pc`; the memory's output
        # holds the next one (read ahead), so decoding starts from a register and the
        # memory's slow clock-to-output stays off the dispatch path.
        instruction = Signal(INSTRUCTION_WIDTH)
        fill = Signal(range(3))       # 0: read the first instruction, 1: it arrives, 2: ready
        ready = fill[1]
        fetch_addr = Signal(range(c.instruction_depth))
        opcode = instruction[0:OPCODE_WIDTH]

        # The units whose state the dispatch decision reads; their inputs are connected
        # once it is made, below.
        m.submodules.weight_loader = loader = WeightLoader(c)
        m.submodules.feeder = feeder = Feeder(c)
        load_active, feed_busy, feed_bank = loader.busy, feeder.busy, feeder.feeding_bank
        inflight_idle = [feeder.inflight_idle[b] for b in range(2)]

        # The requantization unit (its activity gates dispatch); its inputs are connected
        # once the dispatch decision is made, below.
        m.submodules.requant = requant = RequantUnit(c)
        requant_active = requant.active

        # -- Sequencer: the step dispatched this cycle ------------------------------------
        # A step is the instruction itself or, inside a GEMM, the LOADW or MATMUL it stands
        # for (npugen.golden.GemmState is the reference for the expansion).
        gemm_weight = Signal(16)      # SETGEMM weight pointer (advances after each GEMM)
        gemm_last_kt = Signal(16)     # SETGEMM's k_tiles - 1, kept ready for the compare
        gemm_started = Signal()
        gemm_matmul_next = Signal()   # 0: the K tile's LOADW is next, 1: its MATMUL
        gemm_kt = Signal(16)
        gemm_weight_run = Signal(16)
        # The K-tile walk (SETGEMM tile_step, SETKERN): tap x, y; the activation word of
        # the tap, of its kernel row and of its channel tile.
        gemm_tile_step = Signal(16)
        kernel_last_x = Signal(8)
        kernel_last_y = Signal(8)
        kernel_row_step = Signal(16)
        gemm_x = Signal(8)
        gemm_y = Signal(8)
        gemm_tap_run = Signal(16)
        gemm_row_run = Signal(16)
        gemm_tile_run = Signal(16)
        # The opcodes the dispatch decision tells apart, decoded when the instruction is
        # loaded (below) and kept in registers beside it: the decision, the sequencer's
        # longest path, then starts from them rather than from a compare.
        decoded_ops = (Opcode.GEMM, Opcode.LOADW, Opcode.MATMUL, Opcode.REQUANT, Opcode.HALT)
        op_is = {op: Signal(init=int(op == 0), name=f"op_is_{op.name.lower()}")
                 for op in decoded_ops}
        is_gemm = op_is[Opcode.GEMM]
        gemm_weight_now = Mux(gemm_started, gemm_weight_run, gemm_weight)
        gemm_act_field = _field(instruction, Opcode.GEMM, "act_addr")
        gemm_act_now = Mux(gemm_started, gemm_tap_run, gemm_act_field)
        gemm_row_now = Mux(gemm_started, gemm_row_run, gemm_act_field)
        gemm_tile_now = Mux(gemm_started, gemm_tile_run, gemm_act_field)
        gemm_empty = Signal(init=1)   # SETGEMM's k_tiles == 0 (no SETGEMM yet: 0 tiles)
        gemm_last = Signal()
        m.d.comb += gemm_last.eq(gemm_matmul_next & (gemm_kt == gemm_last_kt))

        step_op = Signal(OPCODE_WIDTH)
        step_bank = Signal()
        step_weight_addr = Signal(16)
        step_act_addr = Signal(16)
        step_acc_addr = Signal(16)
        step_count = Signal(16)
        step_accumulate = Signal()
        step_combine = Signal()
        with m.If(is_gemm):
            m.d.comb += [
                step_op.eq(Mux(gemm_matmul_next, Opcode.MATMUL, Opcode.LOADW)),
                step_bank.eq(_field(instruction, Opcode.GEMM, "bank") ^ gemm_kt[0]),
                step_weight_addr.eq(gemm_weight_now),
                step_act_addr.eq(gemm_act_now),
                step_acc_addr.eq(_field(instruction, Opcode.GEMM, "acc_addr")),
                step_count.eq(_field(instruction, Opcode.GEMM, "count")),
                step_accumulate.eq(_field(instruction, Opcode.GEMM, "accumulate")
                                   | (gemm_kt != 0)),
                step_combine.eq(_field(instruction, Opcode.GEMM, "combine")),
            ]
            with m.If(gemm_empty):  # nothing to expand: stop as illegal
                m.d.comb += step_op.eq(Opcode.GEMM)
        with m.Else():
            m.d.comb += [
                step_op.eq(opcode),
                step_bank.eq(_field(instruction, Opcode.LOADW, "bank")),
                step_weight_addr.eq(_field(instruction, Opcode.LOADW, "weight_addr")),
                step_act_addr.eq(_field(instruction, Opcode.MATMUL, "act_addr")),
                step_acc_addr.eq(_field(instruction, Opcode.MATMUL, "acc_addr")),
                step_count.eq(_field(instruction, Opcode.MATMUL, "count")),
                step_accumulate.eq(_field(instruction, Opcode.MATMUL, "accumulate")),
                step_combine.eq(_field(instruction, Opcode.MATMUL, "combine")),
            ]
        advance = Signal()  # the step completes its instruction: the PC moves on
        m.d.comb += advance.eq(~is_gemm | gemm_last | gemm_empty)

        # The step's kind from the decoded flags (step_op spelt out): a GEMM stands for its
        # LOADW or MATMUL, or for nothing (illegal) when it has no K tiles.
        gemm_step = is_gemm & ~gemm_empty
        step_is_loadw = Signal()
        step_is_matmul = Signal()
        m.d.comb += [
            step_is_loadw.eq(Mux(is_gemm, gemm_step & ~gemm_matmul_next, op_is[Opcode.LOADW])),
            step_is_matmul.eq(Mux(is_gemm, gemm_step & gemm_matmul_next, op_is[Opcode.MATMUL])),
        ]
        step_is_requant, step_is_halt = op_is[Opcode.REQUANT], op_is[Opcode.HALT]
        step_waits = step_is_loadw | step_is_matmul | step_is_requant | step_is_halt
        can_issue = Signal()
        m.d.comb += can_issue.eq(
            (step_is_loadw & ~load_active & Array(inflight_idle)[step_bank]
             & ~(feed_busy & (feed_bank == step_bank)))
            | (step_is_matmul & feeder.ready & ~(load_active & (loader.loading_bank == step_bank)))
            | (step_is_requant & ~feed_busy & feeder.drain_idle)
            | (step_is_halt & ~feed_busy & feeder.drain_idle & ~load_active)
            | ~step_waits)
        dispatch = Signal()
        m.d.comb += dispatch.eq(running & ready & ~requant_active & can_issue)
        # Host owns the instruction port only outside runs.
        instruction_read = reads[Region.INSTRUCTIONS]
        with m.If(running):
            m.d.comb += [instruction_read.addr.eq(fetch_addr),
                         instruction_read.en.eq(~ready | (dispatch & advance))]
            with m.If(instruction_read.en):
                m.d.sync += fetch_addr.eq(fetch_addr + 1)
            with m.If((fill == 1) | (dispatch & advance)):
                m.d.sync += instruction.eq(instruction_read.data)
                m.d.sync += [flag.eq(instruction_read.data[0:OPCODE_WIDTH] == op)
                             for op, flag in op_is.items()]
            with m.If(~ready):
                m.d.sync += fill.eq(fill + 1)

        m.d.comb += counters.stall.eq(ready & ~dispatch)
        with m.If(dispatch & advance):
            m.d.sync += pc.eq(pc + 1)
        with m.If(dispatch & is_gemm):
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
        with m.If(dispatch):
            with m.Switch(step_op):
                with m.Case(Opcode.HALT):
                    m.d.sync += [running.eq(0), done.eq(1)]
                with m.Case(Opcode.SETPP):
                    m.d.comb += requant.set_pp.eq(1)
                with m.Case(Opcode.SETREQ):
                    m.d.comb += requant.set_req.eq(1)
                with m.Case(Opcode.SETGEMM):
                    m.d.sync += [
                        gemm_weight.eq(_field(instruction, Opcode.SETGEMM, "weight_addr")),
                        gemm_last_kt.eq(_field(instruction, Opcode.SETGEMM, "k_tiles") - 1),
                        gemm_empty.eq(_field(instruction, Opcode.SETGEMM, "k_tiles") == 0),
                        gemm_tile_step.eq(_field(instruction, Opcode.SETGEMM, "tile_step")),
                    ]
                if fm:
                    with m.Case(Opcode.SETKERN):
                        m.d.sync += [
                            kernel_last_x.eq(_field(instruction, Opcode.SETKERN, "kernel_w") - 1),
                            kernel_last_y.eq(_field(instruction, Opcode.SETKERN, "kernel_h") - 1),
                            kernel_row_step.eq(
                                _field(instruction, Opcode.SETKERN, "kernel_row_step")),
                        ]
                    with m.Case(Opcode.SETWIN):
                        m.d.comb += feeder.set_win.eq(1)
                    with m.Case(Opcode.SETOUT):
                        m.d.comb += requant.set_out.eq(1)
                with m.Case(Opcode.LOADW, Opcode.MATMUL, Opcode.REQUANT):
                    pass  # handled by the units below
                with m.Default():
                    m.d.sync += [running.eq(0), illegal.eq(1)]

        # -- Weight loader, feeder ---------------------------------------------------------
        m.d.comb += [
            loader.dispatch.eq(dispatch & step_is_loadw), loader.bank.eq(step_bank),
            loader.weight_addr.eq(step_weight_addr), loader.abort.eq(abort),
            array.weight_row.eq(loader.weight_row), array.load.eq(loader.load),
            array.load_bank.eq(loader.load_bank),
        ]
        grant_read(m, reads[Region.WEIGHTS], loader.weight_read)
        m.d.comb += [
            feeder.dispatch.eq(dispatch & step_is_matmul), feeder.bank.eq(step_bank),
            feeder.act_addr.eq(step_act_addr), feeder.acc_addr.eq(step_acc_addr),
            feeder.count.eq(step_count), feeder.accumulate.eq(step_accumulate),
            feeder.combine.eq(step_combine), feeder.instruction.eq(instruction),
            feeder.run_start.eq(start), feeder.abort.eq(abort), feeder.running.eq(running),
            array.act.eq(feeder.act), array.bank.eq(feeder.array_bank),
            counters.issue.eq(feeder.issue.valid),
        ]
        grant_read(m, reads[Region.ACTIVATIONS], feeder.act_read)

        # -- Accumulate path -------------------------------------------------------------
        m.submodules.accumulate = accumulate = AccumulatePath(c)
        m.d.comb += [
            accumulate.issue.eq(feeder.issue), accumulate.result.eq(array.result),
            accumulate.running.eq(running),
            accumulate.inject_read.eq(requant.inject_read), accumulate.inject.eq(requant.inject),
            accumulate.inject_row.eq(requant.inject_row),
        ]
        acc_read = reads[Region.ACCUMULATORS]
        grant_read(m, acc_read, accumulate.acc_read)
        grant_write(m, writes[Region.ACCUMULATORS], accumulate.acc_write)

        # -- Requantization unit -------------------------------------------------------------
        m.d.comb += [requant.instruction.eq(instruction),
                     requant.dispatch.eq(dispatch & step_is_requant),
                     requant.run_start.eq(start), requant.abort.eq(abort),
                     requant.running.eq(running)]
        grant_read(m, reads[Region.PARAMS], requant.param_read)
        grant_read(m, acc_read, requant.acc_read)
        grant_write(m, writes[Region.ACTIVATIONS], requant.act_write)

        # -- Start, abort --------------------------------------------------------------------
        with m.If(start):
            m.d.sync += [gemm_started.eq(0), gemm_matmul_next.eq(0), gemm_kt.eq(0),
                         gemm_x.eq(0), gemm_y.eq(0)]
            # SETKERN starts from its defaults in every run.
            if fm:
                m.d.sync += [kernel_last_x.eq(0), kernel_last_y.eq(0), kernel_row_step.eq(0)]
            m.d.sync += [running.eq(1), fill.eq(0), fetch_addr.eq(start_pc), pc.eq(start_pc),
                         done.eq(0), aborted.eq(0), illegal.eq(0)]
        with m.If(abort):
            m.d.sync += [running.eq(0), aborted.eq(1)]
        return m
