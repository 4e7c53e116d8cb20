"""Family mapping of the NPU's memories.

The generic design keeps every memory a ``lib.memory.Memory`` (block RAM on FPGAs,
portable towards ASIC flows). On iCE40 the memories of the implementation's
``spram_regions`` (by default the weight memory, the largest) go to the iCE40UP5K's
single-port SPRAM (four SB_SPRAM256KA, 16K words of 16 bits each) instead of its 30 EBR
of 4 Kbit; the rest stay in EBR.
"""

from amaranth import Array, Cat, ClockSignal, Const, Module, Mux, Signal, unsigned
from amaranth.hdl import Instance
from amaranth.lib.memory import Memory, ReadPort, WritePort

from ..memory_map import MemoryInfo
from .implementation import Implementation

__all__ = ["SPRAM_WIDTH", "SPRAM_DEPTH", "SPRAM_BLOCKS", "spram_blocks", "memory_ports",
           "extra_read_port"]

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
        mem = Memory(shape=unsigned(info.width), depth=info.depth, init=[])
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
