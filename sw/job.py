"""A job: memory contents to load, a start address, and memory ranges to read back.

The golden model and every simulator (and, through the host link, a board) run the same
job, so their results can be compared word for word. Packing to host words follows
``memory_map``: lane i of an entry holds bits [i·w, (i+1)·w), least significant first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import NpuConfig
from .golden import Counters, GoldenNpu
from .layouts import param_lane_fields
from .memory_map import COUNTER_NAMES, MemoryInfo, Region, address, memories

__all__ = ["Job", "JobResult", "lane_format", "pack_entries", "unpack_entries", "run_golden"]


def lane_format(config: NpuConfig, region: Region) -> tuple[tuple[int, bool], ...]:
    """The (width, signed) of each field of one lane of ``region``."""
    return {
        Region.INSTRUCTIONS: ((64, False),),
        Region.ACTIVATIONS: ((config.input_width, True),),
        Region.WEIGHTS: ((config.weight_width, True),),
        Region.ACCUMULATORS: ((config.accumulator_width, True),),
        Region.PARAMS: tuple((f.width, f.signed)
                             for f in param_lane_fields(config.accumulator_width)),
    }[Region(region)]


def _lanes(config: NpuConfig, region: Region) -> int:
    return {
        Region.INSTRUCTIONS: 1, Region.ACTIVATIONS: config.rows, Region.WEIGHTS: config.cols,
        Region.ACCUMULATORS: config.cols, Region.PARAMS: config.requant_lanes,
    }[Region(region)]


def _check_range(name: str, values: np.ndarray, width: int, signed: bool) -> None:
    low, high = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
    if values.size and (values.min() < low or values.max() > high):
        bad = values[(values < low) | (values > high)].flat[0]
        raise ValueError(f"{name} value {int(bad)} does not fit {'' if signed else 'un'}signed "
                         f"{width} bits ({low} to {high})")


def pack_entries(config: NpuConfig, region: Region, values: np.ndarray) -> np.ndarray:
    """Entries of ``region`` as host words: shape (entries, stride), dtype uint32."""
    info: MemoryInfo = memories(config)[Region(region)]
    fmt = lane_format(config, region)
    lanes = _lanes(config, region)
    values = np.asarray(values)
    values = values.reshape(len(values), lanes, len(fmt))
    words = np.zeros((len(values), info.stride), dtype=np.uint32)
    if Region(region) is not Region.INSTRUCTIONS:
        for index, (width, signed) in enumerate(fmt):
            _check_range(f"{info.name} field {index}", values[..., index], width, signed)
    values = values.tolist()
    for e, entry in enumerate(values):
        bits, position = 0, 0
        for lane in entry:
            for (width, _), value in zip(fmt, lane, strict=True):
                bits |= (int(value) & ((1 << width) - 1)) << position
                position += width
        for w in range(info.stride):
            words[e, w] = (bits >> (32 * w)) & 0xFFFFFFFF
    return words


def unpack_entries(config: NpuConfig, region: Region, words: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_entries`; returns int64 lanes (uint64 for instructions)."""
    fmt = lane_format(config, region)
    lanes = _lanes(config, region)
    words = np.asarray(words, dtype=np.uint64)
    dtype = np.uint64 if Region(region) is Region.INSTRUCTIONS else np.int64
    out = np.zeros((len(words), lanes, len(fmt)), dtype=dtype)
    for e, entry in enumerate(words):
        bits = sum(int(w) << (32 * i) for i, w in enumerate(entry))
        for lane in range(lanes):
            for index, (width, signed) in enumerate(fmt):
                value = bits & ((1 << width) - 1)
                bits >>= width
                if signed and value >> (width - 1):
                    value -= 1 << width
                out[e, lane, index] = value
    if len(fmt) == 1:
        out = out[..., 0]
    if Region(region) is Region.INSTRUCTIONS:
        out = out[:, 0]
    return out


@dataclass
class Job:
    """What to load, where to start, what to read back."""

    config: NpuConfig
    writes: list[tuple[Region, int, np.ndarray]] = field(default_factory=list)
    reads: dict[str, tuple[Region, int, int]] = field(default_factory=dict)
    start_pc: int = 0
    # The job runs on what the job before it left (the next stage of a program in
    # stages): a target runs it right after that one, on the same NPU.
    follows: bool = False

    def write(self, region: Region, entry: int, values: np.ndarray) -> None:
        depth = memories(self.config)[region].depth
        if entry < 0 or entry + len(values) > depth:
            raise ValueError(f"{region.name.lower()}: {len(values)} words at {entry} exceed "
                             f"the depth of {depth}")
        self.writes.append((Region(region), entry, np.asarray(values)))

    def read(self, name: str, region: Region, entry: int, count: int) -> None:
        self.reads[name] = (Region(region), entry, count)

    def host_writes(self) -> tuple[np.ndarray, np.ndarray]:
        """(addresses, words) of every host-bus write that loads this job."""
        addresses, words = [], []
        infos = memories(self.config)
        for region, entry, values in self.writes:
            packed = pack_entries(self.config, region, values)
            stride = infos[region].stride
            base = address(region, entry * stride)
            addresses.append(base + np.arange(packed.size, dtype=np.uint32))
            words.append(packed.reshape(-1))
        if not addresses:
            return np.zeros(0, np.uint32), np.zeros(0, np.uint32)
        return (np.concatenate(addresses).astype(np.uint32),
                np.concatenate(words).astype(np.uint32))

    def read_addresses(self, name: str) -> np.ndarray:
        region, entry, count = self.reads[name]
        stride = memories(self.config)[region].stride
        return (address(region, entry * stride) + np.arange(count * stride)).astype(np.uint32)

    def decode_read(self, name: str, words: np.ndarray) -> np.ndarray:
        region, _, count = self.reads[name]
        stride = memories(self.config)[region].stride
        return unpack_entries(self.config, region, np.asarray(words).reshape(count, stride))


@dataclass
class JobResult:
    """What a run of a job gives back: each of the job's reads by name (entries decoded
    into lanes, as :func:`unpack_entries` returns them) and the performance counters."""

    outputs: dict[str, np.ndarray]
    counters: Counters
    run_seconds: float | None = None  # wall time of the run alone, where measured


def counters_from_words(words: list[int], config: NpuConfig) -> Counters:
    """The COUNTERS registers' words (low word first) as an NPU of ``config`` counts them."""
    values = [int(words[2 * i]) | (int(words[2 * i + 1]) << 32) for i in range(len(COUNTER_NAMES))]
    return Counters(**dict(zip(COUNTER_NAMES, values, strict=True))).as_counted_by(config)


def run_golden(job: Job, npu: GoldenNpu | None = None) -> JobResult:
    """Run ``job`` on ``npu`` (by default a fresh golden model): load its writes, run from
    its start address, read back; the counters are the cycle model's.
    :class:`~npugen.target.GoldenTarget` passes its own model, which keeps its memories.

    Raises :class:`~npugen.golden.ProgramError` if a write overflows a memory, no HALT
    follows the start address, or an instruction cannot run
    (:func:`~npugen.golden.check_program`), and ``ValueError`` for an unknown opcode
    between the start address and the first HALT (the words past it never run)."""
    if npu is None:
        npu = GoldenNpu(job.config)
    for region, entry, values in job.writes:
        npu.write(region, entry, values)
    counters = npu.run(job.start_pc)
    outputs = {name: npu.read(*spec) for name, spec in job.reads.items()}
    return JobResult(outputs, counters)
