"""The host port's address map: registers, the identity block and the memories.

The host port is a bus of 32-bit words. Word address bits [24:32] select a region (0–5;
any other value names none); bits [0:24] are the offset in it. A memory entry wider
than 32 bits spans ``stride`` consecutive addresses (a power of two), least significant word first.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

from .config import BOOL_FIELDS, DATAFLOWS, ROUNDINGS, NpuConfig
from .isa import INSTRUCTION_WIDTH, ISA_VERSION
from .layouts import param_lane_description

__all__ = [
    "MAGIC", "REGION_SHIFT", "HOST_READ_LATENCY", "Region", "Reg", "Control", "Status",
    "MemoryInfo", "memories", "parted_memories", "identity_words", "config_from_identity",
    "COUNTER_NAMES", "COUNTER_BITS", "address", "register_bits", "region_words", "WIDE_READ_STRIDE",
    "host_read_latency", "flag_bit", "register_spans", "check_register_map",
]

MAGIC = 0x4E505547  # "NPUG"
REGION_SHIFT = 24
#: Cycles from a host read request to its answer (``rvalid`` with ``rdata``), one more
#: when a memory's entries span WIDE_READ_STRIDE host words or more (host_read_latency).
HOST_READ_LATENCY = 3
#: From this many host words an entry, a read registers the whole entry before it
#: selects the word: a block RAM's slow output then drives only that register.
WIDE_READ_STRIDE = 8
HOST_WORD_BITS = 32


class Region(enum.IntEnum):
    """The regions of the host port, by the number in address bits [24:28]
    (:func:`address`): the registers (:class:`Reg`), then the NPU's memories
    (:func:`memories`)."""

    REGISTERS = 0
    INSTRUCTIONS = 1
    ACTIVATIONS = 2
    WEIGHTS = 3
    ACCUMULATORS = 4
    PARAMS = 5


#: Width of the performance counters and UPTIME. Each reads as two words, low then high;
#: the high word's upper bits read 0. 2**48 cycles is 38 days at 85 MHz; narrower than 64
#: bits, they leave room on the iCE40UP5K (docs/BOARDS.md).
COUNTER_BITS = 48
#: Performance counters, COUNTER_BITS each, at COUNTERS + 2·i (low word) and +1 (high word).
COUNTER_NAMES = ("cycles", "busy_cycles", "macs", "stall_cycles")


class Reg(enum.IntEnum):
    """Register offsets in the REGISTERS region."""

    MAGIC = 0x00
    ISA_VERSION = 0x01
    CONFIG = 0x02  # one word per NpuConfig field, in field order
    CONTROL = 0x40
    STATUS = 0x41
    START_PC = 0x42
    PC = 0x43
    COUNTERS = 0x50
    UPTIME = 0x58  # free-running cycle counter, COUNTER_BITS wide (low word, then high word)


class Control(enum.IntFlag):
    """Bits written to CONTROL."""

    START = 1  # clear counters and status, run from START_PC until HALT
    ABORT = 2  # stop a run at once (units are reset)


class Status(enum.IntFlag):
    """Bits of the read-only STATUS register, each placed by :func:`flag_bit`.
    CONTROL.START clears them and sets RUNNING."""

    RUNNING = 1        # a run is on
    DONE = 2           # the last run reached HALT
    HOST_CONFLICT = 4  # a memory was accessed by the host during a run (sticky)
    ABORTED = 8        # CONTROL.ABORT was written since the last START (it stops a run)
    # The last run stopped at an instruction it cannot execute: an unknown opcode, a GEMM
    # with no K tiles, or (on an NPU without feature maps) SETKERN, SETWIN or SETOUT.
    ILLEGAL_INSTRUCTION = 16


def flag_bit(flag: Control | Status) -> int:
    """The bit position of a one-bit CONTROL or STATUS flag (the gateware places and
    decodes each by it)."""
    value = int(flag)
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{flag!r} is not a single bit")
    return value.bit_length() - 1


@dataclass(frozen=True)
class MemoryInfo:
    """One of the NPU's memories as the host port sees it (:func:`memories`)."""

    name: str         # "weights", ...: in the docs, the gateware and messages
    region: Region
    depth: int        # entries
    width: int        # bits an entry
    granularity: int  # bits per write-enable lane
    # Never read and written in the same cycle (one single-port RAM may hold it): the
    # weights (the host writes them outside a run), and the activations with
    # NpuConfig.single_port_activations.
    single_port: bool = False

    @property
    def stride(self) -> int:
        """Host words per entry: a power of two."""
        words = -(-self.width // HOST_WORD_BITS)
        return 1 << (words - 1).bit_length()


def _gcd32(bits: int) -> int:
    from math import gcd
    return gcd(bits, HOST_WORD_BITS)


def memories(config: NpuConfig) -> dict[Region, MemoryInfo]:
    """Every memory of the NPU, by region."""
    infos = [
        MemoryInfo("instructions", Region.INSTRUCTIONS, config.instruction_depth,
                   INSTRUCTION_WIDTH, 32),
        # Lane-granular: REQUANT writes single activation lanes.
        MemoryInfo("activations", Region.ACTIVATIONS, config.activation_depth,
                   config.activation_word_width, _gcd32(config.input_width),
                   single_port=config.single_port_activations),
        MemoryInfo("weights", Region.WEIGHTS, config.weight_depth,
                   config.weight_word_width, _gcd32(config.weight_word_width),
                   single_port=True),
        MemoryInfo("accumulators", Region.ACCUMULATORS, config.accumulator_depth,
                   config.accumulator_word_width, _gcd32(config.accumulator_word_width)),
        MemoryInfo("params", Region.PARAMS, config.param_depth,
                   config.param_word_width, _gcd32(config.param_word_width)),
    ]
    return {info.region: info for info in infos}


def parted_memories(config: NpuConfig) -> frozenset[Region]:
    """The memories built as parts read together (the weights with ``weight_segments``,
    hw/npu.py): block RAM, never an iCE40's SPRAM."""
    return frozenset({Region.WEIGHTS} if config.weight_segments > 1 else ())


def address(region: Region, offset: int = 0) -> int:
    """The host-port word address of ``offset`` in ``region``: ``region << 24 | offset``.
    ``offset`` counts host words (a memory's entry is ``stride`` of them); it is not
    checked against the region's size (the NPU refuses what lies past it), but it must lie
    within the region's address bits.

    Raises ValueError if ``offset`` is negative or 2**24 or more: it would name another
    region's word."""
    if not 0 <= offset < 1 << REGION_SHIFT:
        raise ValueError(f"offset {offset} is outside a region's {REGION_SHIFT}-bit "
                         f"addresses (0 to {(1 << REGION_SHIFT) - 1})")
    return (int(region) << REGION_SHIFT) | offset


def host_read_latency(config: NpuConfig) -> int:
    """Cycles from a host read request to its answer on an NPU of ``config``."""
    wide = any(info.stride >= WIDE_READ_STRIDE for info in memories(config).values())
    return HOST_READ_LATENCY + wide


#: Words of each register that spans more than one (the others: one word).
_REGISTER_WORDS = {Reg.CONFIG: len(NpuConfig.field_names()), Reg.UPTIME: 2}


def register_spans(counter_names: Sequence[str] = COUNTER_NAMES) -> dict[str, tuple[int, int]]:
    """Every register of the registers' block by name, as (first offset, words): each
    ``Reg``, with COUNTERS one pair of words per name of ``counter_names``."""
    spans = {}
    for reg in Reg:
        if reg is Reg.COUNTERS:
            spans.update({name.upper(): (Reg.COUNTERS + 2 * index, 2)
                          for index, name in enumerate(counter_names)})
        else:
            spans[reg.name] = (int(reg), _REGISTER_WORDS.get(reg, 1))
    return spans


def check_register_map(spans: Mapping[str, tuple[int, int]],
                       words: int = 1 << REGION_SHIFT) -> None:
    """Raise ``ValueError`` if two registers of ``spans`` (``register_spans``) overlap,
    one reaches past ``words``, or the identity block (MAGIC, ISA_VERSION, CONFIG: what
    ``identity_words`` lists) is not contiguous."""
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    for (name, (first, count)), (after, (start, _)) in pairwise(ordered):
        if first + count > start:
            raise ValueError(f"register {after} at {start:#04x} overlaps {name} "
                             f"({first:#04x} to {first + count - 1:#04x}); move one of them")
    name, (first, count) = ordered[-1]
    if first + count > words:
        raise ValueError(f"register {name} ({first:#04x} to {first + count - 1:#04x}) "
                         f"reaches past the registers' {words} words")
    identity = [spans[name] for name in ("MAGIC", "ISA_VERSION", "CONFIG")]
    if any(a + words_a != b for (a, words_a), (b, _) in pairwise(identity)):
        raise ValueError(f"the identity block must be contiguous: MAGIC, ISA_VERSION, "
                         f"CONFIG at {', '.join(f'{a:#04x}' for a, _ in identity)}")


check_register_map(register_spans())


def register_bits(config: NpuConfig) -> int:
    """Offset bits the register block decodes: it spans ``2**register_bits`` words (the
    same for every config)."""
    return (max(first + words for first, words in register_spans().values()) - 1).bit_length()


def region_words(config: NpuConfig) -> dict[Region, int]:
    """Host words each region spans: the registers' block (a power of two), and each
    memory's depth × stride (a power of two unless the depth is not). A READ or WRITE
    past them is refused (BAD_ADDRESS)."""
    sizes = {Region.REGISTERS: 1 << register_bits(config)}
    sizes.update({region: info.depth * info.stride
                  for region, info in memories(config).items()})
    return sizes


def identity_words(config: NpuConfig) -> list[int]:
    """The read-only identity block: magic, ISA version, then every config field."""
    words = [MAGIC, ISA_VERSION]
    for name, value in config.to_dict().items():
        words.append(DATAFLOWS.index(value) if name == "dataflow" else
                     ROUNDINGS.index(value) if name == "rounding" else int(value))
    return words


def config_from_identity(words: list[int]) -> NpuConfig:
    """Inverse of :func:`identity_words`; raises ``ValueError`` for a foreign device."""
    if len(words) < 2 or words[0] != MAGIC:
        got = f"{words[0]:#010x}" if words else "nothing"
        raise ValueError(f"not an npugen NPU: magic {got}, expected {MAGIC:#010x}")
    if words[1] != ISA_VERSION:
        raise ValueError(f"NPU speaks ISA version {words[1]}, this host {ISA_VERSION}")
    names = NpuConfig.field_names()
    if len(words) != 2 + len(names):
        raise ValueError(f"the identity block has {len(words) - 2} config words, this host "
                         f"expects {len(names)}: rebuild the bitstream with this npugen")
    values = dict(zip(names, words[2:], strict=True))
    values["dataflow"] = DATAFLOWS[values["dataflow"]]
    values["rounding"] = ROUNDINGS[values["rounding"]]
    values.update({name: bool(values[name]) for name in BOOL_FIELDS})
    return NpuConfig(**values)


def memory_map_markdown(config: NpuConfig | None = None) -> str:
    """``docs/MEMORY_MAP.md``, generated from this module."""
    config = config or NpuConfig()
    lines = [
        "# Host port memory map",
        "",
        "Generated from `sw/memory_map.py` by `python -c 'from npugen.memory_map import "
        "memory_map_markdown as m; print(m(), end=\"\")' > docs/MEMORY_MAP.md`; a test "
        "checks that it is current.",
        "",
        "The host port carries 32-bit words. A word address is `region << "
        f"{REGION_SHIFT} | offset`. Requests are taken one a cycle; a read answers "
        f"{HOST_READ_LATENCY} cycles later, or {HOST_READ_LATENCY + 1} when a memory's "
        f"entries span {WIDE_READ_STRIDE} or more host words (this configuration: "
        f"{host_read_latency(config)}), with `rvalid` (reads pipeline: one may be "
        "requested every cycle). "
        "Every address bit is decoded: an address outside the regions, registers "
        "and memory depths below reads 0 and ignores writes on the host port, and the "
        "host link refuses it (BAD_ADDRESS, PROTOCOL.md). Memories are reachable only "
        "while no run is on: during a run a memory access is dropped (reads give 0) and "
        "STATUS.HOST_CONFLICT is set.",
        "",
        "## Regions",
        "",
        "| region | number | entry width (default config) | host words per entry |",
        "|---|---|---|---|",
        f"| registers | {int(Region.REGISTERS)} | 32 | 1 |",
    ]
    for region, info in memories(config).items():
        lines.append(f"| {info.name} | {int(region)} | {info.width} bits | {info.stride} |")
    lines += [
        "",
        f"The registers' block spans {region_words(config)[Region.REGISTERS]} words; a "
        "memory region spans its depth × host words per entry.",
        "",
        "An entry wider than 32 bits spans a power-of-two number of consecutive addresses, "
        "least significant word first; lane i of an entry holds bits [i·w, (i+1)·w). "
        + param_lane_description(),
        "",
        "## Registers (region 0)",
        "",
        "| offset | name | access | meaning |",
        "|---|---|---|---|",
        f"| {Reg.MAGIC:#04x} | MAGIC | read | {MAGIC:#010x} (\"NPUG\") |",
        f"| {Reg.ISA_VERSION:#04x} | ISA_VERSION | read | {ISA_VERSION} |",
    ]
    for index, name in enumerate(NpuConfig.field_names()):
        meaning = ("index into " + ", ".join(DATAFLOWS)) if name == "dataflow" else (
            "index into " + ", ".join(ROUNDINGS)) if name == "rounding" else "value"
        lines.append(f"| {Reg.CONFIG + index:#04x} | CONFIG.{name} | read | {meaning} |")
    lines += [
        f"| {Reg.CONTROL:#04x} | CONTROL | write | "
        + ", ".join(f"bit {flag_bit(flag)}: {flag.name}" for flag in Control) + " |",
        f"| {Reg.STATUS:#04x} | STATUS | read | "
        + ", ".join(f"bit {flag_bit(flag)}: {flag.name}" for flag in Status) + " |",
        f"| {Reg.START_PC:#04x} | START_PC | read/write | first instruction of the next run |",
        f"| {Reg.PC:#04x} | PC | read | the sequencer's program counter |",
    ]
    for index, name in enumerate(COUNTER_NAMES):
        offset = Reg.COUNTERS + 2 * index
        lines.append(f"| {offset:#04x}, {offset + 1:#04x} | {name.upper()} | read | "
                     f"counter `{name}`, {COUNTER_BITS} bits: low word then high word (cleared "
                     f"by START) |")
    lines.append(f"| {Reg.UPTIME:#04x}, {Reg.UPTIME + 1:#04x} | UPTIME | read | clock "
                 f"cycles since reset, {COUNTER_BITS} bits: low word then high word (never "
                 f"cleared; it wraps after 2^{COUNTER_BITS} cycles) |")
    lines += [
        "",
        "CONTROL.START clears the counters and STATUS and runs from START_PC until HALT; "
        "it is ignored during a run. CONTROL.ABORT stops a run at once and sets "
        "STATUS.ABORTED. Both act inside the NPU the cycle after the write; STATUS and the "
        "running/done outputs show the run as started from the write on. An unknown opcode "
        "stops the run with STATUS.ILLEGAL_INSTRUCTION.",
        "",
        "Counters: `cycles` counts every cycle of a run, from the first fetch to HALT; "
        "`busy_cycles` the cycles in which the array takes an activation word; `macs` "
        "adds rows × cols per such cycle (padding included); `stall_cycles` the cycles in "
        "which a fetched instruction waits for a unit. An NPU generated with "
        "`activity_counters = false` counts only `cycles`: the other three read 0, and "
        "the host, which knows the config from the identity block, reports them as absent.",
        "",
    ]
    return "\n".join(lines)
