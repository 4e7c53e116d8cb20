"""The NPU: memories, systolic array, post-processing, sequencer and host port.

Units and their issue rules (the golden model's :class:`~npugen.golden.CycleModel`
mirrors them cycle for cycle):

- the *sequencer* dispatches at most one instruction a cycle, in order;
- the *weight loader* (LOADW) shifts a tile into one bank while the *feeder* (MATMUL)
  streams activations through the other, so preload is hidden;
- results leave the array ``array.latency + 1`` cycles after issue and are added into the
  accumulator memory (read-modify-write, transparent for back-to-back rows);
- the *requantizer* (REQUANT) runs ``requant_lanes`` channels a cycle after the array
  has drained and blocks dispatch until its last write.
"""

from amaranth import Array, Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig
from ..isa import INSTRUCTION_WIDTH, OPCODE_WIDTH, Opcode
from ..memory_map import (
    COUNTER_BITS,
    COUNTER_NAMES,
    HOST_READ_LATENCY,
    REGION_SHIFT,
    WIDE_READ_STRIDE,
    Control,
    Reg,
    Region,
    Status,
    flag_bit,
    host_read_latency,
    identity_words,
    memories,
    register_bits,
)
from ..timing import weight_use_cycles
from .array import SystolicArray, psum_width
from .hostbus import HostBus
from .instruction import instruction_field as _field
from .ports import grant_read, grant_write
from .ram import memory_ports
from .requant_unit import RequantUnit

__all__ = ["Npu"]

# The cycle model's constants for registers this file builds by hand: the host read path
# (request, memory or register read, per-source word, answer). Changing a constant means
# changing the registers here.
if HOST_READ_LATENCY != 3 or WIDE_READ_STRIDE < 2:
    raise ImportError("hw/npu.py builds a 3-cycle host read; update it with "
                      "HOST_READ_LATENCY")


def _flags_word(flags: type[Status], values: dict):
    """A register word of ``flags``: each flag's value at its bit (``flag_bit``), 0 in
    the bits no flag has. Every flag must have a value."""
    if set(values) != set(flags):
        missing = ", ".join(flag.name for flag in flags if flag not in values)
        raise ValueError(f"{flags.__name__} flags without a value: {missing}")
    by_bit = {flag_bit(flag): value for flag, value in values.items()}
    return Cat(*(by_bit.get(bit, Const(0, 1)) for bit in range(max(by_bit) + 1)))


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
        host = self.host

        # -- Memories -----------------------------------------------------------------
        reads, writes = {}, {}
        for region, info in infos.items():
            writes[region], reads[region] = memory_ports(
                m, platform, info, transparent=region is Region.ACCUMULATORS)

        m.submodules.array = array = SystolicArray(c)

        running = Signal()

        # -- Host port: decode ---------------------------------------------------------
        # Every address bit is decoded: no region or register answers at two addresses.
        region = host.addr[REGION_SHIFT:32]
        offset = host.addr[0:REGION_SHIFT]
        read_region = Signal(32 - REGION_SHIFT)
        read_offset = Signal(REGION_SHIFT)
        read_blocked = Signal()
        host_conflict = Signal()
        # A read is answered HOST_READ_LATENCY (3) cycles after its request: the memories
        # answer a cycle after it, late in the cycle (ECP5 block RAM: 5.8 ns from the
        # clock), so each source's word is registered on its own, zero unless read; the
        # next cycle ORs them into the answer's register. A memory whose entries span
        # WIDE_READ_STRIDE words or more registers the whole entry first and selects the
        # word a cycle later (a 16:1 select behind the block RAM missed 75 MHz on the
        # ULX3S-85F's 12×12); the other sources' words wait a cycle, ORed, and the read
        # is answered a cycle later (host_read_latency).
        latency = host_read_latency(c)
        read_stage = [Signal(name=f"read_stage{i}") for i in range(latency)]
        m.d.sync += [read_stage[0].eq(host.valid & ~host.write),
                     *[later.eq(earlier)
                       for earlier, later in zip(read_stage, read_stage[1:], strict=False)]]
        m.d.comb += host.rvalid.eq(read_stage[-1])
        with m.If(host.valid & ~host.write):
            m.d.sync += [read_region.eq(region), read_offset.eq(offset),
                         read_blocked.eq(running)]
        # A host address names a memory entry only below the memory's depth.
        in_memory = {}
        for mem_region, info in infos.items():
            stride_bits = (info.stride - 1).bit_length()
            entry = offset >> stride_bits
            if info.depth & (info.depth - 1):
                in_memory[mem_region] = entry < info.depth
            else:
                in_memory[mem_region] = (entry >> (info.depth - 1).bit_length()) == 0
        read_in_memory = Signal()
        with m.If(host.valid & ~host.write):
            m.d.sync += read_in_memory.eq(Cat(*[
                (region == mem_region) & hit for mem_region, hit in in_memory.items()]).any())
        with m.If(host.valid & running & Cat(*[region == r for r in infos]).any()):
            m.d.sync += host_conflict.eq(1)

        source_words = []   # each read source's word, registered; zero unless it is read
        late_words = []     # the same, a cycle later: the wide memories' words
        for reg_region, info in infos.items():
            stride_bits = (info.stride - 1).bit_length()
            entry = offset >> stride_bits
            chunk = offset[0:stride_bits] if stride_bits else Const(0)
            write, read = writes[reg_region], reads[reg_region]
            selected = host.valid & (region == reg_region) & in_memory[reg_region] & ~running
            # Defaults: the host owns the ports when no run is on; units override below.
            m.d.comb += [read.addr.eq(entry), write.addr.eq(entry)]
            copies = -(-info.width // 32)
            m.d.comb += write.data.eq(Cat(*[host.wdata] * copies))
            lanes_en = [chunk == (k * info.granularity) // 32
                        for k in range(info.width // info.granularity)]
            with m.If(selected & host.write):
                m.d.comb += write.en.eq(Cat(*lanes_en))
            padded = Cat(read.data, Const(0, info.stride * 32 - info.width))
            read_chunk = read_offset[0:stride_bits] if stride_bits else Const(0)
            source_word = Signal(32, name=f"read_word_{info.name}")
            selected_read = (read_region == reg_region) & read_in_memory & ~read_blocked
            if info.stride < WIDE_READ_STRIDE:
                m.d.sync += source_word.eq(Mux(selected_read,
                                               padded.word_select(read_chunk, 32), 0))
                source_words.append(source_word)
                continue
            # The entry goes straight into its register (the enable comes from registers).
            entry_held = Signal(info.width, name=f"read_entry_{info.name}")
            chunk_held = Signal.like(read_chunk, name=f"read_chunk_{info.name}")
            selected_held = Signal(name=f"read_selected_{info.name}")
            with m.If(selected_read):
                m.d.sync += entry_held.eq(read.data)
            m.d.sync += [chunk_held.eq(read_chunk), selected_held.eq(selected_read)]
            held = Cat(entry_held, Const(0, info.stride * 32 - info.width))
            m.d.sync += source_word.eq(Mux(selected_held, held.word_select(chunk_held, 32), 0))
            late_words.append(source_word)

        # -- Registers -----------------------------------------------------------------
        identity = identity_words(c)
        start_pc = Signal(range(c.instruction_depth))
        pc = Signal(range(c.instruction_depth))
        done = Signal()
        aborted = Signal()
        illegal = Signal()
        start = Signal()   # pulses the cycle after a CONTROL write asks for a run
        abort = Signal()
        # Seen from the host, a run begins with the write: no stale `done` in between.
        m.d.comb += [self.running.eq(running | start), self.done.eq(done & ~start)]
        # Every busy cycle adds rows × cols MACs. For a power of two the count is
        # busy_cycles shifted (no logic); otherwise it is counted on its own, since the
        # product would put a 64-bit multiplier on the register read path (12×8: 51 MHz on
        # the ULX3S-85F).
        macs_per_cycle = c.rows * c.cols
        macs_derived = (macs_per_cycle & (macs_per_cycle - 1)) == 0
        counters = {name: Signal(COUNTER_BITS, name=f"counter_{name}") for name in COUNTER_NAMES
                    if name != "macs" or not macs_derived}
        if macs_derived:
            counters_read = dict(counters, macs=Signal(COUNTER_BITS))
            m.d.comb += counters_read["macs"].eq(
                counters["busy_cycles"] << (macs_per_cycle.bit_length() - 1))
        else:
            counters_read = counters
        uptime = Signal(COUNTER_BITS)
        m.d.sync += uptime.eq(uptime + 1)
        # A register read is decoded over two cycles: the region and the offset's high bits
        # with the request, the register's index from the registered offset the cycle after
        # (the values are those of that cycle).
        offset_bits = register_bits(c)
        read_is_register = Signal()
        with m.If(host.valid & ~host.write):
            m.d.sync += read_is_register.eq((region == Region.REGISTERS)
                                            & ((offset >> offset_bits) == 0))
        register_value = Signal(32)
        with m.Switch(read_offset[0:offset_bits]):
            for index, word in enumerate(identity):
                with m.Case(Reg.MAGIC + index):
                    m.d.comb += register_value.eq(word)
            with m.Case(Reg.STATUS):
                m.d.comb += register_value.eq(_flags_word(Status, {
                    Status.RUNNING: running | start, Status.DONE: done & ~start,
                    Status.HOST_CONFLICT: host_conflict, Status.ABORTED: aborted,
                    Status.ILLEGAL_INSTRUCTION: illegal}))
            with m.Case(Reg.START_PC):
                m.d.comb += register_value.eq(start_pc)
            with m.Case(Reg.PC):
                m.d.comb += register_value.eq(pc)
            with m.Case(Reg.UPTIME):
                m.d.comb += register_value.eq(uptime[0:32])
            with m.Case(Reg.UPTIME + 1):
                m.d.comb += register_value.eq(uptime[32:64])
            for index, name in enumerate(COUNTER_NAMES):
                value = counters_read[name]
                with m.Case(Reg.COUNTERS + 2 * index):
                    m.d.comb += register_value.eq(value[0:32])
                with m.Case(Reg.COUNTERS + 2 * index + 1):
                    m.d.comb += register_value.eq(value[32:64])
        register_word = Signal(32)
        m.d.sync += register_word.eq(Mux(read_is_register, register_value, 0))
        answer = register_word
        for word in source_words:
            answer = answer | word
        if late_words:
            early_answer = Signal(32)
            m.d.sync += early_answer.eq(answer)
            answer = early_answer
            for word in late_words:
                answer = answer | word
        m.d.sync += host.rdata.eq(answer)

        # A CONTROL write takes effect the cycle after it: start and abort fan out to much
        # of the NPU, and the host's write data may come straight from a block RAM.
        m.d.sync += [start.eq(0), abort.eq(0)]
        register_write = host.valid & host.write & (region == Region.REGISTERS)
        with m.If(register_write):
            with m.Switch(offset):
                with m.Case(Reg.CONTROL):
                    m.d.sync += [start.eq(host.wdata[flag_bit(Control.START)] & ~running),
                                 abort.eq(host.wdata[flag_bit(Control.ABORT)])]
                with m.Case(Reg.START_PC):
                    m.d.sync += start_pc.eq(host.wdata)

        # -- Unit state ------------------------------------------------------------------
        rows, cols = c.rows, c.cols
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

        load_busy = Signal()
        load_count = Signal(range(rows))
        load_addr = Signal(range(c.weight_depth))
        load_bank = Signal()
        shift_valid = Signal()
        shift_bank = Signal()
        load_active = load_busy | shift_valid

        feed_busy = Signal()
        feed_remaining = Signal(16)
        feed_act_addr = Signal(range(c.activation_depth))
        feed_acc_addr = Signal(range(c.accumulator_depth))
        feed_bank = Signal()
        feed_accumulate = Signal()
        feed_max = Signal()
        # The activation walk (SETWIN), latched at dispatch: a SETWIN may follow a MATMUL
        # while it still streams.
        feed_col = Signal(16)
        feed_row_addr = Signal(range(c.activation_depth))
        feed_last_col = Signal(16)
        feed_row_step = Signal(16)
        feed_col_step = Signal(8)
        feed_reduce = Signal()
        win_last_col = Signal(16, init=0xFFFF)   # SETWIN row_length - 1
        win_row_step = Signal(16)
        win_col_step = Signal(8, init=1)
        win_reduce = Signal()
        # Flags the dispatch decision reads, kept in registers (set below from the values
        # their counters take next) so that no counter compare lengthens it.
        feed_last = Signal()          # feed_remaining == 1
        feeder_ready = ~feed_busy | feed_last
        inflight = Array(Signal(range(weight_use_cycles(rows, cols) + 1), name=f"inflight{b}")
                         for b in range(2))
        drain = Signal(range(array.latency + 3))
        inflight_idle = [Signal(init=1, name=f"inflight{b}_idle") for b in range(2)]  # == 0
        drain_idle = Signal(init=1)   # drain == 0

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
            | (step_is_matmul & feeder_ready & ~(load_active & (load_bank == step_bank)))
            | (step_is_requant & ~feed_busy & drain_idle)
            | (step_is_halt & ~feed_busy & drain_idle & ~load_active)
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

        with m.If(running):
            m.d.sync += counters["cycles"].eq(counters["cycles"] + 1)
            with m.If(ready & ~dispatch):
                m.d.sync += counters["stall_cycles"].eq(counters["stall_cycles"] + 1)
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
                        m.d.sync += [
                            win_last_col.eq(_field(instruction, Opcode.SETWIN, "row_length") - 1),
                            win_row_step.eq(_field(instruction, Opcode.SETWIN, "row_step")),
                            win_col_step.eq(_field(instruction, Opcode.SETWIN, "col_step")),
                            win_reduce.eq(_field(instruction, Opcode.SETWIN, "reduce")),
                        ]
                    with m.Case(Opcode.SETOUT):
                        m.d.comb += requant.set_out.eq(1)
                with m.Case(Opcode.LOADW, Opcode.MATMUL, Opcode.REQUANT):
                    pass  # handled by the units below
                with m.Default():
                    m.d.sync += [running.eq(0), illegal.eq(1)]

        # -- Weight loader -------------------------------------------------------------
        weight_read = reads[Region.WEIGHTS]
        m.d.sync += [shift_valid.eq(load_busy), shift_bank.eq(load_bank)]
        with m.If(load_busy):
            m.d.comb += weight_read.addr.eq(load_addr)
            m.d.sync += [load_addr.eq(load_addr - 1), load_count.eq(load_count + 1)]
            with m.If(load_count == rows - 1):
                m.d.sync += load_busy.eq(0)
        with m.If(dispatch & step_is_loadw):
            m.d.sync += [
                load_busy.eq(1), load_count.eq(0), load_bank.eq(step_bank),
                load_addr.eq(step_weight_addr + rows - 1),
            ]
        m.d.comb += [
            array.weight_row.eq(weight_read.data),
            array.load.eq(shift_valid),
            array.load_bank.eq(shift_bank),
        ]

        # -- Feeder and in-flight tracking -----------------------------------------------
        act_read = reads[Region.ACTIVATIONS]
        issue = Signal()
        m.d.comb += issue.eq(running & feed_busy)
        array_bank = Signal()
        m.d.sync += array_bank.eq(feed_bank)
        m.d.comb += [array.act.eq(act_read.data), array.bank.eq(array_bank)]
        use_cycles = weight_use_cycles(rows, cols)
        for b in range(2):
            with m.If(issue & (feed_bank == b)):
                m.d.sync += [inflight[b].eq(use_cycles - 1),
                             inflight_idle[b].eq(use_cycles == 1)]
            with m.Elif(inflight[b] != 0):
                m.d.sync += [inflight[b].eq(inflight[b] - 1),
                             inflight_idle[b].eq(inflight[b] == 1)]
        with m.If(issue):
            m.d.sync += [drain.eq(array.latency + 2), drain_idle.eq(0)]
        with m.Elif(drain != 0):
            m.d.sync += [drain.eq(drain - 1), drain_idle.eq(drain == 1)]
        with m.If(issue):
            m.d.comb += act_read.addr.eq(feed_act_addr)
            m.d.sync += [
                feed_remaining.eq(feed_remaining - 1),
                counters["busy_cycles"].eq(counters["busy_cycles"] + 1),
            ]
            if not macs_derived:
                m.d.sync += counters["macs"].eq(counters["macs"] + macs_per_cycle)
            if fm:
                with m.If(feed_col == feed_last_col):
                    next_row = feed_row_addr + feed_row_step
                    m.d.sync += [feed_col.eq(0), feed_row_addr.eq(next_row),
                                 feed_act_addr.eq(next_row)]
                with m.Else():
                    m.d.sync += [feed_col.eq(feed_col + 1),
                                 feed_act_addr.eq(feed_act_addr + feed_col_step)]
                with m.If(feed_reduce):  # every row after the first combines into one word
                    m.d.sync += feed_accumulate.eq(1)
                with m.Else():
                    m.d.sync += feed_acc_addr.eq(feed_acc_addr + 1)
            else:
                m.d.sync += [feed_act_addr.eq(feed_act_addr + 1),
                             feed_acc_addr.eq(feed_acc_addr + 1)]
            m.d.sync += feed_last.eq(feed_remaining == 2)
            with m.If(feed_last):
                m.d.sync += feed_busy.eq(0)
        with m.If(dispatch & step_is_matmul):
            m.d.sync += [
                feed_busy.eq(1), feed_remaining.eq(step_count), feed_last.eq(step_count == 1),
                feed_act_addr.eq(step_act_addr), feed_acc_addr.eq(step_acc_addr),
                feed_bank.eq(step_bank), feed_accumulate.eq(step_accumulate),
            ]
            if fm:
                m.d.sync += [
                    feed_max.eq(step_combine), feed_col.eq(0), feed_row_addr.eq(step_act_addr),
                    feed_last_col.eq(win_last_col), feed_row_step.eq(win_row_step),
                    feed_col_step.eq(win_col_step), feed_reduce.eq(win_reduce),
                ]

        # -- Result tags travel beside the data; accumulate on write ------------------------
        tag_layout = data.StructLayout({
            "valid": 1, "accumulate": 1, "max": 1, "addr": range(c.accumulator_depth)})
        tag = Signal(tag_layout)
        m.d.comb += [tag.valid.eq(issue), tag.accumulate.eq(feed_accumulate),
                     tag.max.eq(feed_max), tag.addr.eq(feed_acc_addr)]
        tags = [tag]
        for i in range(array.latency + 1):
            delayed = Signal(tag_layout, name=f"tag_d{i + 1}")
            m.d.sync += delayed.eq(tags[-1])
            tags.append(delayed)
        # `tag` arrives with its result row; the accumulator memory was read for it the
        # cycle before, so what the memory returns and the row are registered side by side
        # and added the cycle after: the memory's slow clock-to-output and the adders sit
        # in different cycles. A row written in the cycle its successor's read data is
        # registered is forwarded; older writes reach the read through the port's
        # transparency.
        read_tag, tag = tags[-2], tags[-1]
        acc_read, acc_write = reads[Region.ACCUMULATORS], writes[Region.ACCUMULATORS]
        row_layout = data.ArrayLayout(signed(c.accumulator_width), cols)
        add_tag = Signal(tag_layout)
        # Without REQUANT to_acc only array rows arrive, each sum no wider than the array's
        # last row makes it (psum_width), and that is all the register keeps: on iCE40
        # each of its bits is a logic cell (it is fed by a register, so shares none).
        arriving_width = c.accumulator_width if fm else psum_width(c, rows)
        add_row = Signal(data.ArrayLayout(signed(arriving_width), cols))
        add_old = Signal(row_layout)
        arriving_tag = Signal(tag_layout)   # the row that arrives now: the array's or REQUANT's
        arriving_row = Signal(row_layout)
        # Plain multiplexers, not If/Else: a process whose inputs settle at time 0 could
        # stay undefined in an event-driven simulator (Icarus).
        injected = Signal(tag_layout)
        m.d.comb += [injected.valid.eq(1), injected.accumulate.eq(requant.inject.accumulate),
                     injected.addr.eq(requant.inject.addr)]
        if fm:
            m.d.comb += [
                arriving_tag.eq(Mux(requant.inject.valid, injected.as_value(), tag.as_value())),
                arriving_row.eq(Mux(requant.inject.valid, requant.inject_row.as_value(),
                                    array.result.as_value())),
            ]
        else:
            m.d.comb += [arriving_tag.eq(tag), arriving_row.eq(array.result)]
        m.d.sync += [add_tag.eq(arriving_tag),
                     *[add_row[k].eq(arriving_row[k]) for k in range(cols)]]
        with m.If(read_tag.valid):
            m.d.comb += acc_read.addr.eq(read_tag.addr)
        if fm:
            with m.If(requant.inject_read.valid):
                m.d.comb += acc_read.addr.eq(requant.inject_read.addr)
        summed = Signal(row_layout)
        width = c.accumulator_width
        if fm:
            # One carry chain per lane does both: old + row, or old − row for max, whose
            # sign picks the larger.
            combined = []
            for k in range(cols):
                operand = Mux(add_tag.max, ~add_row[k], add_row[k])
                total = Signal(signed(width + 2), name=f"combine{k}")
                m.d.comb += total.eq(add_old[k] + operand + add_tag.max)
                combined.append(Mux(add_tag.max,
                                    Mux(total[width + 1], add_row[k], add_old[k]),
                                    total)[0:width])
        else:
            combined = [(add_old[k] + add_row[k])[0:width] for k in range(cols)]
        m.d.comb += summed.eq(Cat(*[Mux(add_tag.accumulate, combined[k], add_row[k])[0:width]
                                    for k in range(cols)]))
        # Gated by running: an aborted run leaves nothing behind (HALT waits for drain).
        writing = add_tag.valid & running
        with m.If(writing & (add_tag.addr == arriving_tag.addr)):
            m.d.sync += add_old.eq(summed)
        with m.Else():
            m.d.sync += add_old.eq(acc_read.data)
        with m.If(writing):
            m.d.comb += [acc_write.addr.eq(add_tag.addr), acc_write.data.eq(summed),
                         acc_write.en.eq(-1)]

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
            # SETKERN and SETWIN start from their defaults in every run.
            if fm:
                m.d.sync += [kernel_last_x.eq(0), kernel_last_y.eq(0), kernel_row_step.eq(0),
                             win_last_col.eq(0xFFFF), win_row_step.eq(0), win_col_step.eq(1),
                             win_reduce.eq(0)]
            m.d.sync += [running.eq(1), fill.eq(0), fetch_addr.eq(start_pc), pc.eq(start_pc),
                         done.eq(0), aborted.eq(0), illegal.eq(0), host_conflict.eq(0)]
            m.d.sync += [counter.eq(0) for counter in counters.values()]
        with m.If(abort):
            m.d.sync += [running.eq(0), aborted.eq(1), load_busy.eq(0), feed_busy.eq(0),
                         drain.eq(0), inflight[0].eq(0), inflight[1].eq(0),
                         drain_idle.eq(1), inflight_idle[0].eq(1), inflight_idle[1].eq(1)]
        return m
