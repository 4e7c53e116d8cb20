"""The host port's address map: registers, the identity block and the memories.

The host port is a bus of 32-bit words. Word address bits [24:28] select a region;
bits [0:24] are the offset in it. A memory entry wider than 32 bits spans
``stride`` consecutive addresses (a power of two), least significant word first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .config import DATAFLOWS, NpuConfig
from .isa import INSTRUCTION_WIDTH, ISA_VERSION

__all__ = [
    "MAGIC", "REGION_SHIFT", "Region", "Reg", "Control", "Status", "MemoryInfo",
    "memories", "identity_words", "config_from_identity", "COUNTER_NAMES", "address",
]

MAGIC = 0x4E505547  # "NPUG"
REGION_SHIFT = 24
HOST_WORD_BITS = 32


class Region(enum.IntEnum):
    REGISTERS = 0
    INSTRUCTIONS = 1
    ACTIVATIONS = 2
    WEIGHTS = 3
    ACCUMULATORS = 4
    PARAMS = 5


#: Performance counters, 64 bits each, at COUNTERS + 2·i (low word) and +1 (high word).
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


class Control(enum.IntFlag):
    """Bits written to CONTROL."""

    START = 1  # clear counters and status, run from START_PC until HALT
    ABORT = 2  # stop a run at once (units are reset)


class Status(enum.IntFlag):
    RUNNING = 1
    DONE = 2           # the last run reached HALT
    HOST_CONFLICT = 4  # a memory was accessed by the host during a run (sticky)
    ABORTED = 8
    ILLEGAL_INSTRUCTION = 16


@dataclass(frozen=True)
class MemoryInfo:
    name: str
    region: Region
    depth: int
    width: int
    granularity: int  # bits per write-enable lane

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
                   config.activation_word_width, _gcd32(config.input_width)),
        MemoryInfo("weights", Region.WEIGHTS, config.weight_depth,
                   config.weight_word_width, _gcd32(config.weight_word_width)),
        MemoryInfo("accumulators", Region.ACCUMULATORS, config.accumulator_depth,
                   config.accumulator_word_width, _gcd32(config.accumulator_word_width)),
        MemoryInfo("params", Region.PARAMS, config.param_depth,
                   config.param_word_width, _gcd32(config.param_word_width)),
    ]
    return {info.region: info for info in infos}


def address(region: Region, offset: int = 0) -> int:
    return (int(region) << REGION_SHIFT) | offset


def identity_words(config: NpuConfig) -> list[int]:
    """The read-only identity block: magic, ISA version, then every config field."""
    words = [MAGIC, ISA_VERSION]
    for name, value in config.to_dict().items():
        words.append(DATAFLOWS.index(value) if name == "dataflow" else int(value))
    return words


def config_from_identity(words: list[int]) -> NpuConfig:
    """Inverse of :func:`identity_words`; raises ``ValueError`` for a foreign device."""
    if len(words) < 2 or words[0] != MAGIC:
        got = f"{words[0]:#010x}" if words else "nothing"
        raise ValueError(f"not an npugen NPU: magic {got}, expected {MAGIC:#010x}")
    if words[1] != ISA_VERSION:
        raise ValueError(f"NPU speaks ISA version {words[1]}, this host {ISA_VERSION}")
    names = NpuConfig.field_names()
    values = dict(zip(names, words[2:2 + len(names)], strict=True))
    values["dataflow"] = DATAFLOWS[values["dataflow"]]
    return NpuConfig(**values)
