"""The host port: address decode, the host's access to the memories outside a run, and
the register block (identity, CONTROL, STATUS, START_PC, PC, UPTIME, the counters).

Every address bit is decoded: no region or register answers at two addresses. A read is
answered ``host_read_latency(config)`` cycles after its request (``HOST_READ_LATENCY``,
one more with wide memories):

- cycle 1: the memories answer, late in the cycle (ECP5 block RAM: 5.6 ns from the clock),
  and the request's region and offset are registered;
- cycle 2: each source's word is registered on its own, zero unless read (a register's
  index is decoded from the registered offset);
- cycle 3: the words are ORed into the answer's register.

A memory whose entries span ``WIDE_READ_STRIDE`` words or more registers the whole entry
first and selects the word a cycle later (a 16:1 select behind the block RAM is too slow
for the ECP5 boards' clocks on a 12-wide array), and the read is answered a cycle later.
Then every memory does the same, as the read takes the extra cycle anyway: a block RAM
across the die from the host port drives only its register (the 85F's weights, 147
DP16KD in use, missed 71.875 MHz by their word select at d875772: 67.6 MHz).
"""

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..config import NpuConfig, check_config_type
from ..memory_map import (
    COUNTER_BITS,
    COUNTER_NAMES,
    HOST_READ_LATENCY,
    REGION_SHIFT,
    WIDE_READ_STRIDE,
    Control,
    MemoryInfo,
    Reg,
    Region,
    Status,
    flag_bit,
    host_read_latency,
    identity_words,
    memories,
    register_bits,
)
from .counters import counters_layout
from .hostbus import HostBus

__all__ = ["HostPort", "HostAccess"]

# The cycle model's constants for the registers built here: request, memory or register
# read, per-source word, answer.
if HOST_READ_LATENCY != 3 or WIDE_READ_STRIDE < 2:
    raise ImportError("hw/host_port.py builds a 3-cycle host read; update it with "
                      "HOST_READ_LATENCY")


def _flags_word(flags: type[Status], values: dict):
    """A register word of ``flags``: each flag's value at its bit (``flag_bit``), 0 in
    the bits no flag has. Every flag must have a value."""
    if set(values) != set(flags):
        missing = ", ".join(flag.name for flag in flags if flag not in values)
        raise ValueError(f"{flags.__name__} flags without a value: {missing}")
    by_bit = {flag_bit(flag): value for flag, value in values.items()}
    return Cat(*(by_bit.get(bit, Const(0, 1)) for bit in range(max(by_bit) + 1)))


class HostAccess(wiring.Signature):
    """The host's use of one memory, seen from the host port: the entry ``addr`` its
    read and write ports default to, the word ``data`` written in the lanes set in ``en``,
    and ``read_data``, the read port's output."""

    def __init__(self, info: MemoryInfo):
        super().__init__({
            "addr": Out(range(info.depth)),
            "data": Out(info.width),
            "en": Out(info.width // info.granularity),
            "read_data": In(info.width),
        })


class HostPort(wiring.Component):
    """The host bus ``host`` decoded. One member per memory, named as the memory
    (``memories(config)``), is its :class:`HostAccess`; memory accesses while ``running``
    are refused (reads answer 0) and set STATUS.HOST_CONFLICT.

    A CONTROL write pulses ``start`` (unless running) or ``abort`` the cycle after it:
    they fan out to much of the NPU, and the host's write data may come straight from a
    block RAM. ``start_pc`` is the START_PC register. ``running``, ``done``, ``aborted``,
    ``illegal``, ``pc``, ``counters`` and ``uptime`` are read through the registers.
    """

    def __init__(self, config: NpuConfig):
        self._config = check_config_type(config)
        self._infos = memories(config)
        super().__init__({
            "host": In(HostBus()),
            "running": In(1),
            "done": In(1),
            "aborted": In(1),
            "illegal": In(1),
            "pc": In(range(config.instruction_depth)),
            "counters": In(counters_layout()),
            "uptime": In(COUNTER_BITS),
            "start": Out(1),
            "abort": Out(1),
            "start_pc": Out(range(config.instruction_depth)),
            **{info.name: Out(HostAccess(info)) for info in self._infos.values()},
        })

    @property
    def config(self) -> NpuConfig:
        return self._config

    def elaborate(self, platform):
        m = Module()
        host = self.host
        region = host.addr[REGION_SHIFT:32]
        offset = host.addr[0:REGION_SHIFT]
        reading = host.valid & ~host.write
        read_region = Signal(32 - REGION_SHIFT)
        read_offset = Signal(REGION_SHIFT)
        latency = host_read_latency(self._config)
        read_stage = [Signal(name=f"read_stage{i}") for i in range(latency)]
        m.d.sync += [read_stage[0].eq(reading),
                     *[later.eq(earlier)
                       for earlier, later in zip(read_stage, read_stage[1:], strict=False)]]
        m.d.comb += host.rvalid.eq(read_stage[-1])
        with m.If(reading):
            m.d.sync += [read_region.eq(region), read_offset.eq(offset)]
        source_words, late_words, host_conflict = self._memories(
            m, region, offset, read_region, read_offset)
        register_word = self._registers(m, region, offset, read_offset, host_conflict)
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
        return m

    def _memories(self, m, region, offset, read_region, read_offset):
        """The memories' host accesses; returns each memory's word of a read, registered
        (zero unless read), those of the wide memories apart, and the HOST_CONFLICT
        flag."""
        host, running = self.host, self.running
        reading = host.valid & ~host.write
        read_blocked = Signal()
        host_conflict = Signal()
        with m.If(reading):
            m.d.sync += read_blocked.eq(running)
        # A host address names a memory entry only below the memory's depth.
        in_memory = {}
        for mem_region, info in self._infos.items():
            stride_bits = (info.stride - 1).bit_length()
            entry = offset >> stride_bits
            if info.depth & (info.depth - 1):
                in_memory[mem_region] = entry < info.depth
            else:
                in_memory[mem_region] = (entry >> (info.depth - 1).bit_length()) == 0
        read_in_memory = Signal()
        with m.If(reading):
            m.d.sync += read_in_memory.eq(Cat(*[
                (region == mem_region) & hit for mem_region, hit in in_memory.items()]).any())
        with m.If(host.valid & running & Cat(*[region == r for r in self._infos]).any()):
            m.d.sync += host_conflict.eq(1)
        with m.If(self.start):
            m.d.sync += host_conflict.eq(0)

        source_words = []   # each read source's word, registered; zero unless it is read
        late_words = []     # the same, a cycle later: the memories' words, if one is wide
        late = host_read_latency(self._config) > HOST_READ_LATENCY
        for mem_region, info in self._infos.items():
            access = getattr(self, info.name)
            stride_bits = (info.stride - 1).bit_length()
            entry = offset >> stride_bits
            chunk = offset[0:stride_bits] if stride_bits else Const(0)
            selected = host.valid & (region == mem_region) & in_memory[mem_region] & ~running
            # The ports' defaults: the units override them during a run.
            m.d.comb += access.addr.eq(entry)
            copies = -(-info.width // 32)
            m.d.comb += access.data.eq(Cat(*[host.wdata] * copies))
            lanes_en = [chunk == (k * info.granularity) // 32
                        for k in range(info.width // info.granularity)]
            with m.If(selected & host.write):
                m.d.comb += access.en.eq(Cat(*lanes_en))
            padded = Cat(access.read_data, Const(0, info.stride * 32 - info.width))
            read_chunk = read_offset[0:stride_bits] if stride_bits else Const(0)
            source_word = Signal(32, name=f"read_word_{info.name}", reset_less=True)
            selected_read = (read_region == mem_region) & read_in_memory & ~read_blocked
            if not late:
                m.d.sync += source_word.eq(Mux(selected_read,
                                               padded.word_select(read_chunk, 32), 0))
                source_words.append(source_word)
                continue
            # The entry goes straight into its register (the enable comes from registers).
            entry_held = Signal(info.width, name=f"read_entry_{info.name}", reset_less=True)
            chunk_held = Signal.like(read_chunk, name=f"read_chunk_{info.name}")
            selected_held = Signal(name=f"read_selected_{info.name}")
            with m.If(selected_read):
                m.d.sync += entry_held.eq(access.read_data)
            m.d.sync += [chunk_held.eq(read_chunk), selected_held.eq(selected_read)]
            held = Cat(entry_held, Const(0, info.stride * 32 - info.width))
            m.d.sync += source_word.eq(Mux(selected_held, held.word_select(chunk_held, 32), 0))
            late_words.append(source_word)
        return source_words, late_words, host_conflict

    def _registers(self, m, region, offset, read_offset, host_conflict):
        """The register block; returns a read's register word, registered (zero unless a
        register is read)."""
        host, running, start = self.host, self.running, self.start
        # A register read is decoded over two cycles: the region and the offset's high bits
        # with the request, the register's index from the registered offset the cycle after
        # (the values are those of that cycle).
        offset_bits = register_bits(self._config)
        read_is_register = Signal()
        with m.If(host.valid & ~host.write):
            m.d.sync += read_is_register.eq((region == Region.REGISTERS)
                                            & ((offset >> offset_bits) == 0))
        register_value = Signal(32)
        with m.Switch(read_offset[0:offset_bits]):
            for index, word in enumerate(identity_words(self._config)):
                with m.Case(Reg.MAGIC + index):
                    m.d.comb += register_value.eq(word)
            with m.Case(Reg.STATUS):
                # Seen from the host, a run begins with the write: no stale `done` then.
                m.d.comb += register_value.eq(_flags_word(Status, {
                    Status.RUNNING: running | start, Status.DONE: self.done & ~start,
                    Status.HOST_CONFLICT: host_conflict, Status.ABORTED: self.aborted,
                    Status.ILLEGAL_INSTRUCTION: self.illegal}))
            with m.Case(Reg.START_PC):
                m.d.comb += register_value.eq(self.start_pc)
            with m.Case(Reg.PC):
                m.d.comb += register_value.eq(self.pc)
            with m.Case(Reg.UPTIME):
                m.d.comb += register_value.eq(self.uptime[0:32])
            with m.Case(Reg.UPTIME + 1):
                m.d.comb += register_value.eq(self.uptime[32:64])
            for index, name in enumerate(COUNTER_NAMES):
                value = getattr(self.counters, name)
                with m.Case(Reg.COUNTERS + 2 * index):
                    m.d.comb += register_value.eq(value[0:32])
                with m.Case(Reg.COUNTERS + 2 * index + 1):
                    m.d.comb += register_value.eq(value[32:64])
        register_word = Signal(32)
        m.d.sync += register_word.eq(Mux(read_is_register, register_value, 0))

        # CONTROL and START_PC writes; start and abort take effect the cycle after.
        m.d.sync += [start.eq(0), self.abort.eq(0)]
        with m.If(host.valid & host.write & (region == Region.REGISTERS)):
            with m.Switch(offset):
                with m.Case(Reg.CONTROL):
                    m.d.sync += [start.eq(host.wdata[flag_bit(Control.START)] & ~running),
                                 self.abort.eq(host.wdata[flag_bit(Control.ABORT)])]
                with m.Case(Reg.START_PC):
                    m.d.sync += self.start_pc.eq(host.wdata)
        return register_word
