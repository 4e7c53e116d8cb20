"""Family mapping of the NPU's memories.

The generic design keeps every memory a ``lib.memory.Memory`` (block RAM on FPGAs,
portable towards ASIC flows). A memory whose depth is not a power of two is several,
one per binary digit of its depth (:class:`StackedMemory`): each maps to block RAM
without a depth multiplexer behind its output, which on the ECP5 boards was the slowest
path of a 9,216-word weight memory (nine 1024-word DP16KDs deep). On iCE40 the memories
of the implementation's ``spram_regions`` (by default the weight memory, the largest) go
to the iCE40UP5K's single-port SPRAM (four SB_SPRAM256KA, 16K words of 16 bits each)
instead of its 30 EBR of 4 Kbit; the rest stay in EBR.
"""

from amaranth import Array, Cat, ClockSignal, Const, Elaboratable, Module, Mux, Signal, unsigned
from amaranth.hdl import Instance
from amaranth.lib.memory import Memory, ReadPort, WritePort

from ..memory_map import MemoryInfo
from .implementation import Implementation

__all__ = ["SPRAM_WIDTH", "SPRAM_DEPTH", "SPRAM_BLOCKS", "StackedMemory", "spram_blocks",
           "memory_ports", "extra_read_port", "power_of_two_parts"]

#: Word width, depth and count of the iCE40UP5K's SB_SPRAM256KA.
SPRAM_WIDTH = 16
SPRAM_DEPTH = 16384
SPRAM_BLOCKS = 4
#: Bits per SB_SPRAM256KA write-mask lane (MASKWREN).
_SPRAM_MASK_BITS = 4


def spram_blocks(implementation: Implementation, info: MemoryInfo) -> int:
    """How many SB_SPRAM256KA hold memory ``info`` on ``implementation``; 0 when it stays
    a generic memory (not one of its ``spram_regions``, which only iCE40 has, write lanes
    that are not whole mask lanes, or more blocks than the chip has)."""
    if (info.region not in implementation.spram_regions
            or info.granularity % _SPRAM_MASK_BITS):
        return 0
    blocks = -(-info.width // SPRAM_WIDTH) * -(-info.depth // SPRAM_DEPTH)
    return blocks if blocks <= SPRAM_BLOCKS else 0


def memory_ports(m: Module, implementation: Implementation, info: MemoryInfo, *,
                 transparent: bool = False) -> tuple[WritePort, ReadPort]:
    """A write port (lanes of ``info.granularity`` bits) and a synchronous read port of
    memory ``info``, added to ``m``. The read port is transparent for the write port when
    ``transparent``.

    Where ``spram_blocks`` says so, the memory is SB_SPRAM256KA blocks side by side (16
    bits each) and, past 16K words, stacked; their one port writes when any write lane is
    enabled and reads ``read.addr`` otherwise. The read's answer is then valid the cycle
    after a read, as with the generic memory; after a write cycle it is undefined, so the
    user must not read and write in the same cycle (the host writes the weights only when
    no run is on)."""
    if not spram_blocks(implementation, info):
        mem = (Memory(shape=unsigned(info.width), depth=info.depth, init=[])
               if len(power_of_two_parts(info.depth)) == 1 else StackedMemory(info))
        m.submodules[info.name] = mem
        write = mem.write_port(granularity=info.granularity)
        return write, mem.read_port(transparent_for=(write,) if transparent else ())
    if transparent:
        raise ValueError(f"memory {info.name!r}: SPRAM cannot be read and written at once")
    addr_width = (info.depth - 1).bit_length()
    write = WritePort.Signature(addr_width=addr_width, shape=unsigned(info.width),
                                granularity=info.granularity).create(path=(info.name, "w"))
    read = ReadPort.Signature(addr_width=addr_width,
                              shape=unsigned(info.width)).create(path=(info.name, "r"))
    writing = Signal(name=f"{info.name}_writing")
    m.d.comb += writing.eq(write.en.any())
    address = Signal(addr_width, name=f"{info.name}_address")
    m.d.comb += address.eq(Mux(writing, write.addr, read.addr))
    # Lane k of the write port covers mask bits [k·g/4, (k+1)·g/4) of the word.
    lane_of_nibble = info.granularity // _SPRAM_MASK_BITS
    columns = -(-info.width // SPRAM_WIDTH)
    stacks = -(-info.depth // SPRAM_DEPTH)
    nibbles = columns * SPRAM_WIDTH // _SPRAM_MASK_BITS
    mask = Cat(*[write.en[i // lane_of_nibble] if i * _SPRAM_MASK_BITS < info.width
                 else Const(0, 1)
                 for i in range(nibbles)])
    data_in = Cat(write.data, Const(0, columns * SPRAM_WIDTH - info.width))
    spram_addr_width = (SPRAM_DEPTH - 1).bit_length()
    low_bits = min(addr_width, spram_addr_width)
    stack = address[low_bits:] if stacks > 1 else Const(0, 1)
    read_stack = Signal.like(stack, name=f"{info.name}_read_stack")
    m.d.sync += read_stack.eq(stack)
    outputs = []
    for s in range(stacks):
        words = []
        for c in range(columns):
            out = Signal(SPRAM_WIDTH, name=f"{info.name}_spram{s}_{c}_out")
            m.submodules[f"{info.name}_spram{s}_{c}"] = Instance(
                "SB_SPRAM256KA",
                i_ADDRESS=Cat(address[:low_bits], Const(0, spram_addr_width - low_bits)),
                i_DATAIN=data_in.word_select(c, SPRAM_WIDTH),
                i_MASKWREN=mask.word_select(c, SPRAM_WIDTH // _SPRAM_MASK_BITS),
                i_WREN=writing & (stack == s),
                i_CHIPSELECT=Const(1, 1), i_CLOCK=ClockSignal("sync"),
                i_STANDBY=Const(0, 1), i_SLEEP=Const(0, 1), i_POWEROFF=Const(1, 1),
                o_DATAOUT=out,
            )
            words.append(out)
        outputs.append(Cat(*words)[:info.width])
    m.d.comb += read.data.eq(outputs[0] if stacks == 1 else
                             Array(outputs)[read_stack])
    return write, read


def extra_read_port(m: Module, implementation: Implementation, info: MemoryInfo) -> ReadPort:
    """Another synchronous read port of memory ``info``, which :func:`memory_ports` added
    to ``m``: on FPGAs, a copy of its block RAM that every write also writes."""
    if spram_blocks(implementation, info):
        raise ValueError(f"memory {info.name!r}: SPRAM has one port; a second read port "
                         f"needs it in block RAM (the implementation's spram_regions)")
    return m.submodules[info.name].read_port()


def power_of_two_parts(depth: int) -> list[int]:
    """The binary digits of ``depth``, largest first: 9216 -> [8192, 1024]."""
    return [1 << bit for bit in reversed(range(depth.bit_length())) if depth >> bit & 1]


class StackedMemory(Elaboratable):
    """A memory of ``info.depth`` words, not a power of two, as one ``Memory`` per
    :func:`power_of_two_parts` of it, stacked: part k holds the addresses from the sum of
    the larger parts on. An address's part is a chain of single-bit tests (addresses
    below the depth only: every user checks them), and a read's part, registered with
    it, picks the part's output. Ports as ``Memory``'s: ``write_port(granularity=)`` and
    ``read_port(transparent_for=)`` (synchronous), until it is elaborated."""

    def __init__(self, info: MemoryInfo):
        self._info = info
        self._sizes = power_of_two_parts(info.depth)
        self._parts = [Memory(shape=unsigned(info.width), depth=size, init=[])
                       for size in self._sizes]
        self._addr_width = (info.depth - 1).bit_length()
        self._writes = []   # (the port, the parts' ports)
        self._reads = []

    def _part_of(self, addr) -> list:
        """For each part, whether ``addr`` is in it: its bit of the part is 0 and the
        larger parts' bits are 1 (the last part: those bits are 1)."""
        selects, above = [], Const(1, 1)
        for k, size in enumerate(self._sizes):
            bit = addr[size.bit_length() - 1]
            last = k == len(self._sizes) - 1
            selects.append(above if last else above & ~bit)
            above = above & bit
        return selects

    def write_port(self, *, granularity: int) -> WritePort:
        port = WritePort.Signature(addr_width=self._addr_width,
                                   shape=unsigned(self._info.width),
                                   granularity=granularity).create(
            path=(self._info.name, f"w{len(self._writes)}"))
        self._writes.append((port, [part.write_port(granularity=granularity)
                                    for part in self._parts]))
        return port

    def read_port(self, *, transparent_for=()) -> ReadPort:
        port = ReadPort.Signature(addr_width=self._addr_width,
                                  shape=unsigned(self._info.width)).create(
            path=(self._info.name, f"r{len(self._reads)}"))
        writes = [parts for write, parts in self._writes if write in transparent_for]
        self._reads.append((port, [
            part.read_port(transparent_for=[parts[k] for parts in writes])
            for k, part in enumerate(self._parts)]))
        return port

    def elaborate(self, platform):
        m = Module()
        for k, part in enumerate(self._parts):
            m.submodules[f"part{k}"] = part
        for port, parts in self._writes:
            for part_port, size, selected in zip(parts, self._sizes,
                                                 self._part_of(port.addr), strict=True):
                m.d.comb += [part_port.addr.eq(port.addr[:size.bit_length() - 1]),
                             part_port.data.eq(port.data),
                             part_port.en.eq(Mux(selected, port.en, 0))]
        for i, (port, parts) in enumerate(self._reads):
            # The part whose output the read shows, registered as the parts register
            # the address (only when the port is enabled: its output holds otherwise).
            shown = Signal(range(len(parts)), name=f"r{i}_part")
            with m.If(port.en):
                m.d.sync += shown.eq(_index(self._part_of(port.addr)))
            for part_port, size in zip(parts, self._sizes, strict=True):
                m.d.comb += [part_port.addr.eq(port.addr[:size.bit_length() - 1]),
                             part_port.en.eq(port.en)]
            m.d.comb += port.data.eq(Array(part.data for part in parts)[shown])
        return m


def _index(selects: list):
    """The index of the one high bit among ``selects`` (one-hot)."""
    index = Const(0, range(len(selects)))
    for k, selected in enumerate(selects):
        index = Mux(selected, k, index)
    return index
