"""Family mapping of the NPU's memories.

The generic design keeps every memory a ``lib.memory.Memory`` (block RAM on FPGAs,
portable towards ASIC flows). A memory whose depth is not a power of two is several,
one per binary digit of its depth (:class:`StackedMemory`): each maps to block RAM
without a depth multiplexer behind its output, which on the ECP5 boards was the slowest
path of a 9,216-word weight memory (nine 1024-word DP16KDs deep). On iCE40 the memories
of the implementation's ``spram_regions`` that are single-port (by default the weight
memory, and the activations of an NPU generated with ``single_port_activations``) go to
the iCE40UP5K's single-port SPRAM (four SB_SPRAM256KA, 16K words of 16 bits each, the
weights' first: :func:`spram_plan`) instead of its 30 EBR of 4 Kbit; the rest stay in
EBR.

A read port that is not transparent may meet a write of the same word in the same cycle
only where the program rules exclude it (the host's accesses during a run are refused,
and between runs it makes one a cycle; within a run the golden model's checks keep an
overlapping REQUANT's or FILL's writes off the words the instructions beside it read):
such memories carry yosys's ``no_rw_check`` attribute, so synthesis adds no logic to
return the old word on a collision (on a 4×4 for the UP5K, 204 LUT4s and 215
flip-flops, docs/BOARDS.md). RTL simulations check the rule: with the implementation's
``poison_collisions`` a colliding read returns the written lanes inverted, and a read of a
single-port memory in a cycle it is written returns every lane inverted (SPRAM's output
is undefined then).
"""

from amaranth import Array, Cat, ClockSignal, Const, Elaboratable, Module, Mux, Signal, unsigned
from amaranth.hdl import Instance, Value
from amaranth.lib.memory import Memory, ReadPort, WritePort

from ..memory_map import MemoryInfo, Region
from .implementation import Implementation

__all__ = ["SPRAM_WIDTH", "SPRAM_DEPTH", "SPRAM_BLOCKS", "StackedMemory", "spram_blocks",
           "spram_plan",
           "memory_ports", "extra_read_port", "power_of_two_parts",
           "collisions_dont_care"]

#: Word width, depth and count of the iCE40UP5K's SB_SPRAM256KA.
SPRAM_WIDTH = 16
SPRAM_DEPTH = 16384
SPRAM_BLOCKS = 4
#: Bits per SB_SPRAM256KA write-mask lane (MASKWREN).
_SPRAM_MASK_BITS = 4


def spram_blocks(implementation: Implementation, info: MemoryInfo, taken: int = 0) -> int:
    """How many SB_SPRAM256KA hold memory ``info`` on ``implementation`` when other
    memories have ``taken`` of them; 0 when it stays a generic memory (not single-port, not
    one of its ``spram_regions``, which only iCE40 has, write lanes that are not whole mask
    lanes, or more blocks than are left)."""
    if (not info.single_port or info.region not in implementation.spram_regions
            or info.granularity % _SPRAM_MASK_BITS):
        return 0
    blocks = -(-info.width // SPRAM_WIDTH) * -(-info.depth // SPRAM_DEPTH)
    return blocks if blocks <= SPRAM_BLOCKS - taken else 0


def spram_plan(implementation: Implementation, infos: dict[Region, MemoryInfo],
               in_parts: frozenset[Region] = frozenset()) -> dict[Region, int]:
    """The SB_SPRAM256KA each memory of ``infos`` takes (:func:`spram_blocks`), given in
    turn, the weights first, then the activations, to the memories that fit in what is
    left. Memories ``in_parts`` (the weights of an NPU with ``weight_segments``, read in
    parts together) stay in block RAM."""
    order = sorted(infos, key=lambda region: (region is not Region.WEIGHTS,
                                              region is not Region.ACTIVATIONS))
    plan, taken = {}, 0
    for region in order:
        plan[region] = (0 if region in in_parts else
                        spram_blocks(implementation, infos[region], taken))
        taken += plan[region]
    return {region: plan[region] for region in infos}


def memory_ports(m: Module, implementation: Implementation, info: MemoryInfo, *,
                 transparent: bool = False, spram_taken: int = 0,
                 address_select: Value | None = None) -> tuple[WritePort, ReadPort]:
    """A write port (lanes of ``info.granularity`` bits) and a synchronous read port of
    memory ``info``, added to ``m``. The read port is transparent for the write port when
    ``transparent``.

    Where ``spram_blocks`` says so (other memories having ``spram_taken`` of the blocks,
    :func:`spram_plan`), the memory is SB_SPRAM256KA blocks side by side (16
    bits each) and, past 16K words, stacked; their one port writes when any write lane is
    enabled and reads ``read.addr`` otherwise. The read's answer is then valid the cycle
    after a read, as with the generic memory; after a write cycle it is undefined, so the
    user must not read and write in the same cycle (the host writes the weights only when
    no run is on). The port's address is the write port's when ``address_select`` is high
    (default: whenever it writes). A user whose writers all but some put the same address
    on both ports (the NPU's host) may pass only the others' writes (the units'), keeping
    the first writers' enables off the address path."""
    if not spram_blocks(implementation, info, spram_taken):
        # Collisions are don't-care on a memory read only through non-transparent ports.
        attrs = {} if transparent else {"no_rw_check": 1}
        mem = (Memory(shape=unsigned(info.width), depth=info.depth, init=[], attrs=attrs)
               if len(power_of_two_parts(info.depth)) == 1 else StackedMemory(info, attrs))
        m.submodules[info.name] = mem
        write = mem.write_port(granularity=info.granularity)
        read = mem.read_port(transparent_for=(write,) if transparent else ())
        if transparent or not implementation.poison_collisions:
            return write, read
        return write, _poisoned(m, info, write, read)
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
    m.d.comb += address.eq(Mux(writing if address_select is None else address_select,
                               write.addr, read.addr))
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


def collisions_dont_care(rtlil: str) -> tuple[str, int]:
    """``rtlil`` (Amaranth's netlist) with each synchronous read port of a ``no_rw_check``
    memory marked "don't care on a collision" with the write ports it is not transparent
    for (``COLLISION_X_MASK``), and how many ports it marked. yosys reads the attribute
    only for the read ports whose register it merges itself (``memory_dff``); Amaranth's
    are synchronous already, so without this its block RAM mapping still adds the
    logic that returns the old word."""
    marked_memories: set[str] = set()
    attributes: list[str] = []
    out: list[str] = []
    cell: list[str] | None = None
    ports = 0
    for line in rtlil.splitlines(keepends=True):
        words = line.split()
        if cell is not None:
            cell.append(line)
            if words == ["end"]:
                ports += _mark_read_port(cell, marked_memories)
                out += cell
                cell = None
            continue
        if words[:1] == ["module"]:
            marked_memories = set()
        if words[:1] == ["memory"] and "\\no_rw_check" in attributes:
            marked_memories.add(words[-1])
        if words[:2] == ["cell", "$memrd_v2"]:
            cell = [line]
        else:
            out.append(line)
        attributes = attributes + [words[1]] if words[:1] == ["attribute"] else []
    return "".join(out), ports


def _mark_read_port(cell: list[str], marked_memories: set[str]) -> int:
    """Set ``COLLISION_X_MASK`` in the ``$memrd_v2`` ``cell`` (its lines, changed in
    place) to the write ports it is not transparent for, if its memory is marked."""
    values = {line.split()[1]: (i, line.split()[2]) for i, line in enumerate(cell)
              if line.split()[:1] == ["parameter"]}
    memid = values["\\MEMID"][1].strip('"').replace("\\\\", "\\")
    if memid not in marked_memories:
        return 0
    width, bits = values["\\TRANSPARENCY_MASK"][1].split("'")
    mask = "".join("0" if bit == "1" else "1" for bit in bits)
    index = values["\\COLLISION_X_MASK"][0]
    indent = cell[index][:len(cell[index]) - len(cell[index].lstrip())]
    cell[index] = f"{indent}parameter \\COLLISION_X_MASK {width}'{mask}\n"
    return 1


def _poisoned(m: Module, info: MemoryInfo, write: WritePort, read: ReadPort) -> ReadPort:
    """``read`` as a port whose answer has the lanes inverted that ``write`` wrote to the
    same word in the cycle of the read (simulations: ``poison_collisions``)."""
    port = ReadPort.Signature(addr_width=len(read.addr),
                              shape=unsigned(info.width)).create(path=(info.name, "checked"))
    lanes = info.width // info.granularity
    poison = Signal(lanes, name=f"{info.name}_collided")
    m.d.comb += [read.addr.eq(port.addr), read.en.eq(port.en)]
    with m.If(port.en):
        if info.single_port:   # any write: a single port reads nothing then
            m.d.sync += poison.eq(Mux(write.en.any(), (1 << lanes) - 1, 0))
        else:
            m.d.sync += poison.eq(Mux(write.addr == port.addr, write.en, 0))
    m.d.comb += port.data.eq(read.data ^ Cat(*[bit.replicate(info.granularity)
                                               for bit in poison]))
    return port


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
    ``read_port(transparent_for=)`` (synchronous), until it is elaborated. ``attrs``: each
    part's."""

    def __init__(self, info: MemoryInfo, attrs: dict | None = None):
        self._info = info
        self._sizes = power_of_two_parts(info.depth)
        self._parts = [Memory(shape=unsigned(info.width), depth=size, init=[], attrs=attrs)
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
