"""The ``.npu`` program file: what a compiled model needs to run on one NPU configuration.

Layout (little-endian; format version 3, documented in docs/MODELS.md)::

    8 bytes   magic b"NPUGPROG"
    4 bytes   format version (uint32)
    4 bytes   header length H (uint32)
    32 bytes  SHA-256 of every other byte of the file (these 16 before it, all after it)
    H bytes   header, UTF-8 JSON
    ...       segments: packed host-port words (uint32), at the offsets the header gives

The header records the NpuConfig the program was compiled for, the ISA version, the batch
(rows a run), input and output layout and quantization, the layer table and, per
segment, its memory region, first entry, word count, CRC-32 and stage (a program in
stages writes each stage's image before its run; version 2 files have one). The file's checksum
covers the header too, so no changed byte goes unnoticed; the segments' CRC-32s say
where damage is.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import NpuConfig
from .graph import HOST_OPS
from .isa import ISA_VERSION
from .job import pack_entries, unpack_entries
from .memory_map import Region, memories
from .protocol import write_request_bytes

__all__ = ["Program", "TensorLayout", "ProgramFormatError", "MAGIC", "FORMAT_VERSION"]

MAGIC = b"NPUGPROG"
FORMAT_VERSION = 3
#: Older format versions this npugen still reads (2: no stages).
READABLE_VERSIONS = (2, FORMAT_VERSION)
#: A layer row's work of each unit in its cycles (the compiler's cycle model): the array
#: streaming, the weight loader shifting tiles in, the requantizer, the rescale tables
#: (TABLE loads and RESCALE lookups; shown for NPUs that have them); their short names.
UNIT_KEYS = ("array_cycles", "load_cycles", "requant_cycles", "table_cycles")
UNIT_HEADS = ("array", "loads", "requant", "tables")
UNIT_WHAT = ("the array streaming", "the weight loader", "the requantizer",
             "the rescale unit's TABLE loads and lookups")
_PREAMBLE = struct.Struct("<8sII")
_DIGEST_BYTES = hashlib.sha256().digest_size
_BODY = _PREAMBLE.size + _DIGEST_BYTES   # where the header starts


class ProgramFormatError(ValueError):
    """A file that is not a valid npugen program (wrong magic, version, corrupt data)."""


@dataclass(frozen=True)
class TensorLayout:
    """Where a model input or output lives, and how it is quantized.

    Vectors (``map_shape`` None): row m, feature f is activation word
    ``base + (f // rows)·batch + m``, lane ``f % rows``. Feature maps (a CNN's tensors,
    batch 1): a :class:`~npugen.featuremap.FeatureMap` of ``map_shape`` (C, H, W) with
    ``halo`` filled with ``fill``; features are numbered in C·H·W order.
    ``real = scale · (q − zero_point)``. ``shape`` is the model's own (no batch);
    ``layout`` ``"hwc"``: the model gives a map as H×W×C (TFLite's NHWC), which the host
    turns to C·H·W. ``dtype``: the type of the model's own tensor, ``float32`` or ``int8``.
    """

    base: int
    features: int
    shape: tuple[int, ...]
    scale: float
    zero_point: int
    map_shape: tuple[int, int, int] | None = None
    halo: tuple[int, int, int, int] = (0, 0, 0, 0)
    fill: int = 0
    # The input prepared by im2col on the host: kernel h, w, stride, pads (t, l, b, r).
    im2col: tuple[int, ...] | None = None
    layout: str = "chw"
    dtype: str = "float32"

    def to_npu_order(self, values: np.ndarray) -> np.ndarray:
        """(batch, *shape) in the model's layout → (batch, features) in C·H·W order."""
        values = np.asarray(values).reshape(len(values), *self.shape)
        if self.layout == "hwc" and len(self.shape) == 3:
            values = values.transpose(0, 3, 1, 2)
        return values.reshape(len(values), -1)

    def from_npu_order(self, values: np.ndarray) -> np.ndarray:
        """(batch, features) in C·H·W order → (batch, *shape) in the model's layout."""
        values = np.asarray(values)
        if self.layout == "hwc" and len(self.shape) == 3:
            height, width, channels = self.shape
            return values.reshape(len(values), channels, height, width).transpose(0, 2, 3, 1)
        return values.reshape(len(values), *self.shape)

    def pack(self, config: NpuConfig, values: np.ndarray) -> np.ndarray:
        """One input (features in C·H·W order) as the words of its feature map."""
        from .featuremap import im2col

        fmap = self.feature_map(config)
        values = np.asarray(values)
        if self.im2col is not None:
            kh, kw, stride, *pads = self.im2col
            values = im2col(values.reshape(self.map_shape_before_im2col()), (kh, kw), stride,
                            tuple(pads), self.zero_point)
        return fmap.pack(values.reshape(fmap.channels, fmap.height, fmap.width))

    def map_shape_before_im2col(self) -> tuple[int, int, int]:
        """The input map's (C, H, W) as the model gives it (before the host's im2col)."""
        shape = tuple(self.shape)
        return (shape[2], shape[0], shape[1]) if self.layout == "hwc" else shape

    def feature_map(self, config: NpuConfig):
        from .featuremap import FeatureMap

        return FeatureMap(self.base, *self.map_shape, config.rows, config.cols,
                          self.halo, self.fill)

    def to_dict(self) -> dict[str, Any]:
        data = {"base": self.base, "features": self.features, "shape": list(self.shape),
                "scale": float(self.scale), "zero_point": int(self.zero_point)}
        if self.map_shape is not None:
            data.update(map_shape=list(self.map_shape), halo=list(self.halo), fill=self.fill)
        if self.im2col is not None:
            data["im2col"] = list(self.im2col)
        data.update(layout=self.layout, dtype=self.dtype)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorLayout:
        map_shape = data.get("map_shape")
        return cls(int(data["base"]), int(data["features"]), tuple(data["shape"]),
                   float(data["scale"]), int(data["zero_point"]),
                   None if map_shape is None else tuple(int(d) for d in map_shape),
                   tuple(int(d) for d in data.get("halo", (0, 0, 0, 0))),
                   int(data.get("fill", 0)),
                   None if "im2col" not in data else tuple(int(d) for d in data["im2col"]),
                   str(data.get("layout", "chw")), str(data.get("dtype", "float32")))


@dataclass
class Program:
    """A compiled model: instructions and data image for one NpuConfig."""

    config: NpuConfig
    batch: int
    segments: list[tuple[Region, int, np.ndarray]]  # (region, first entry, lane values)
    input: TensorLayout
    output: TensorLayout
    layers: list[dict[str, Any]] = field(default_factory=list)
    estimated_cycles: int = 0
    instruction_count: int = 0
    # Whose arithmetic the program follows (npugen, onnx, tflite) and the operators the
    # host applies to the NPU's output, in order (e.g. TFLite's int8 softmax).
    framework: str = "npugen"
    host_ops: list[dict[str, Any]] = field(default_factory=list)
    # A program in stages (its instructions, weights or parameters more than the NPU holds
    # at once): each stage's image, in order, which every run writes before it starts the
    # stage at address 0; the activations stay on the NPU between stages. ``segments`` is
    # the first stage's. Empty: one image, written once (``segments``).
    stages: list[list[tuple[Region, int, np.ndarray]]] = field(default_factory=list)

    @property
    def macs_per_inference(self) -> int:
        return sum(layer["macs"] for layer in self.layers)

    def images(self) -> list[list[tuple[Region, int, np.ndarray]]]:
        """The image of each stage (one for a program not in stages)."""
        return self.stages or [self.segments]

    def stage_words_per_run(self) -> int:
        """Host-port words a run writes besides its input: every stage's image (0 for a
        program not in stages, whose image is written once)."""
        if not self.stages:
            return 0
        return sum(len(values) * memories(self.config)[region].stride
                   for image in self.stages for region, _, values in image)

    def stage_upload_bytes(self) -> int:
        """Bytes of the host link's WRITE requests that carry every stage's image, each
        run (0 for a program not in stages): at ``baud``, at least
        ``stage_upload_bytes() * UART_BITS_PER_BYTE / baud`` seconds a run."""
        return sum(write_request_bytes(len(values) * memories(self.config)[region].stride)
                   for image in self.stages for region, _, values in image)

    def memory_words(self) -> dict[str, int]:
        """Entries used per memory, by name (the most of any stage)."""
        used: dict[str, int] = {}
        for region, entry, values in (segment for image in self.images()
                                      for segment in image):
            name = memories(self.config)[region].name
            used[name] = max(used.get(name, 0), entry + len(values))
        return used

    # -- file ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        blobs, table, offset = [], [], 0
        for stage, image in enumerate(self.images()):
            for region, entry, values in image:
                words = pack_entries(self.config, region, values).astype("<u4").tobytes()
                table.append({"region": Region(region).name.lower(), "entry": int(entry),
                              "entries": len(values), "offset": offset, "bytes": len(words),
                              "crc32": zlib.crc32(words), "stage": stage})
                blobs.append(words)
                offset += len(words)
        header = {
            "format_version": FORMAT_VERSION, "isa_version": ISA_VERSION,
            "config": self.config.to_dict(), "batch": self.batch,
            "input": self.input.to_dict(), "output": self.output.to_dict(),
            "layers": self.layers, "estimated_cycles": self.estimated_cycles,
            "instruction_count": self.instruction_count, "segments": table,
            "stages": len(self.images()),
            "framework": self.framework, "host_ops": self.host_ops,
        }
        text = json.dumps(header, sort_keys=True).encode()
        preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(text))
        rest = text + b"".join(blobs)
        return preamble + _digest(preamble, rest) + rest

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "program") -> Program:
        """Decode a program file's bytes; ``source`` names it in errors.

        Raises :class:`ProgramFormatError` saying what is wrong: not a program, an older or
        unknown format version, truncated or corrupt (any changed byte fails the file's
        SHA-256 checksum).
        """
        magic = bytes(data[:len(MAGIC)])
        if len(data) < _PREAMBLE.size:
            truncated = magic == MAGIC[:len(magic)] and magic
            raise ProgramFormatError(
                f"{source}: {len(data)} bytes is too short for an npugen program "
                + ("(truncated?)" if truncated else
                   f"and does not begin with its magic {MAGIC!r}: not an npugen program"))
        if magic != MAGIC:
            raise ProgramFormatError(f"{source}: not an npugen program (magic {magic!r}, "
                                     f"expected {MAGIC!r})")
        _, version, header_length = _PREAMBLE.unpack_from(data)
        if version == 1:
            raise ProgramFormatError(f"{source} was written by an older npugen (format "
                                     f"version 1); recompile the model")
        if version not in READABLE_VERSIONS:
            raise ProgramFormatError(f"{source}: unknown program format version {version} "
                                     f"(this npugen reads version {FORMAT_VERSION}): the file "
                                     f"is corrupt or from a newer npugen; recompile the model")
        body = _BODY + header_length
        recorded = data[_PREAMBLE.size:_BODY]
        if len(data) < body or recorded != _digest(data[:_PREAMBLE.size], data[_BODY:]):
            raise ProgramFormatError(f"{source} is corrupt: checksum mismatch"
                                     f"{_damage(data, body)}; recompile the model or copy "
                                     f"the file again")
        try:
            header = json.loads(data[_BODY:body])
            config = NpuConfig.from_dict(header["config"])
            if header["isa_version"] != ISA_VERSION:
                raise ProgramFormatError(f"{source}: compiled for ISA version "
                                         f"{header['isa_version']}, this npugen speaks "
                                         f"{ISA_VERSION}; recompile the model")
            unknown = [op.get("op") for op in header.get("host_ops", [])
                       if op.get("op") not in HOST_OPS]
            if unknown:
                raise ProgramFormatError(f"{source}: asks the host for operator "
                                         f"{unknown[0]!r}, which this npugen does not know "
                                         f"(it knows {', '.join(HOST_OPS)}); recompile the "
                                         f"model with this npugen")
            count = int(header.get("stages", 1))
            if not 1 <= count <= len(header["segments"]) or count > 1 and version < 3:
                raise ValueError(f"{count} stages")
            images: list[list[tuple[Region, int, np.ndarray]]] = [[] for _ in range(count)]
            for seg, blob in _segments(header, data, body):
                region = Region[seg["region"].upper()]
                stride = memories(config)[region].stride
                words = np.frombuffer(blob, dtype="<u4").reshape(seg["entries"], stride)
                images[int(seg.get("stage", 0))].append(
                    (region, int(seg["entry"]), unpack_entries(config, region, words)))
            if any(not image for image in images):
                raise ValueError("a stage has no image")
            return cls(config, int(header["batch"]), images[0],
                       TensorLayout.from_dict(header["input"]),
                       TensorLayout.from_dict(header["output"]), header["layers"],
                       int(header["estimated_cycles"]), int(header["instruction_count"]),
                       str(header.get("framework", "npugen")),
                       list(header.get("host_ops", [])), images if count > 1 else [])
        except ProgramFormatError:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ProgramFormatError(f"{source}: corrupt program header: {error}") from None

    @classmethod
    def load(cls, path: str | Path) -> Program:
        """Read a ``.npu`` file; raises :class:`ProgramFormatError` for a file that cannot
        be read (missing, a directory, no permission) or is not a valid program."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ProgramFormatError(f"program file {str(path)!r} does not exist") from None
        except IsADirectoryError:
            raise ProgramFormatError(f"program file {str(path)!r} is a directory; give the "
                                     f".npu file npugen compile wrote") from None
        except OSError as error:   # permissions, a device that cannot be read
            raise ProgramFormatError(f"cannot read program file {str(path)!r}: "
                                     f"{error.strerror or error}") from None
        return cls.from_bytes(data, source=repr(str(path)))

    def summary(self) -> dict[str, Any]:
        """What ``npugen inspect --json`` prints: the configuration, every layer with
        where it runs (``runs_on``: ``npu``, or ``host`` for the operators the host applies
        to the NPU's output, which take no NPU cycles), its MACs per inference, cycles per
        run and utilization; the totals ``cycles`` (per run), ``cycles_per_inference``,
        ``macs_per_inference`` and ``utilization`` (MACs over cycles × rows × cols); the
        units' work (:meth:`unit_work`)."""
        per_inference = self.estimated_cycles / self.batch
        # The units' columns the table shows (the tables' only on an NPU with them).
        hidden = set(UNIT_KEYS) - set(self.unit_keys())
        layers = [{**{key: value for key, value in layer.items() if key not in hidden},
                   "runs_on": "npu"} for layer in self.layers]
        layers += [{"name": op["op"], "kind": op["op"], "runs_on": "host", "macs": 0,
                    "cycles": 0, "arithmetic": HOST_OPS[op["op"]]} for op in self.host_ops]
        return {"config": self.config.to_dict(), "batch": self.batch,
                "framework": self.framework, "layers": layers,
                "cycles": self.estimated_cycles, "cycles_per_inference": per_inference,
                "macs_per_inference": self.macs_per_inference,
                "utilization": round(self.macs_per_inference
                                     / (per_inference * self.config.macs_per_cycle), 4)
                if per_inference else 0.0,
                "estimated_cycles": self.estimated_cycles,
                "instructions": self.instruction_count, "memory_words": self.memory_words(),
                "stages": len(self.images()), "stage_words_per_run": self.stage_words_per_run(),
                "stage_upload_bytes_per_run": self.stage_upload_bytes(),
                "host_ops": [op["op"] for op in self.host_ops], **self.unit_work()}

    def describe(self) -> str:
        """A human-readable summary: layers, memory use, estimated cycles."""
        c = self.config
        lines = [f"npugen program for a {c.describe()} NPU (config {c.digest()}), "
                 f"batch {self.batch}",
                 f"input {self.input.shape} scale {self.input.scale:.6g} zero point "
                 f"{self.input.zero_point}; output {self.output.shape} scale "
                 f"{self.output.scale:.6g} zero point {self.output.zero_point}",
                 ""]
        # Columns as wide as their longest entry: converters' layer names share long
        # prefixes ("functional_1/conv2d_3"), so a cut name would name nothing.
        name_width = max([len("layer"), *(len(layer["name"]) for layer in self.layers)])
        # Each unit's work in a layer's cycles: the largest says what bounds it.
        shown = [UNIT_KEYS.index(key) for key in self.unit_keys()]
        unit_heads = "".join(f" {UNIT_HEADS[i]:>8}" for i in shown)

        def unit_cells(layer: dict) -> str:
            return "".join(f" {layer[UNIT_KEYS[i]]:>8}" for i in shown)

        if self.layers and "input" in self.layers[0]:   # feature maps: their shapes
            kind_width = max(len(layer["kind"]) for layer in self.layers)
            lines.append(f"{'layer':<{name_width}} {'kind':<{kind_width}} {'input':>8} -> "
                         f"{'output':<9} {'MACs/inference':>14} {'cycles':>10}  "
                         f"{'utilization':>11}{unit_heads}")
            for layer in self.layers:
                shape_in = "×".join(map(str, layer["input"]))
                shape_out = "×".join(map(str, layer["output"]))
                lines.append(f"{layer['name']:<{name_width}} {layer['kind']:<{kind_width}} "
                             f"{shape_in:>8} -> {shape_out:<9} {layer['macs']:>14} "
                             f"{layer['cycles']:>10}  {layer['utilization']:>11.3f}"
                             f"{unit_cells(layer)}")
        else:
            # A dense chain: cycles per run (its batch); programs written before
            # per-layer cycles were kept have none.
            timed = all("cycles" in layer for layer in self.layers)
            lines.append(f"{'layer':<{name_width}} {'in':>5} -> {'out':<5} {'tiles (K x N)':>15} "
                         f"{'weight words':>12} {'MACs/inference':>16}"
                         + (f" {'cycles':>10}  {'utilization':>11}{unit_heads}"
                            if timed else ""))
            for layer in self.layers:
                lines.append(f"{layer['name']:<{name_width}} {layer['in_features']:>5} -> "
                             f"{layer['out_features']:<5} {layer['k_tiles']:>5} x "
                             f"{layer['n_tiles']:<7} {layer['weight_words']:>12} "
                             f"{layer['macs']:>16}"
                             + (f" {layer['cycles']:>10}  {layer['utilization']:>11.3f}"
                                f"{unit_cells(layer)}" if timed else ""))
        if shown:
            lines.append(f"({', '.join(UNIT_HEADS[i] for i in shown)}: cycles of each "
                         "unit's work for the layer: "
                         f"{', '.join(UNIT_WHAT[i] for i in shown)})")
        for op in self.host_ops:
            lines.append(f"then on the host: {op['op']} ({HOST_OPS[op['op']]})")
        lines.append("")
        for info in memories(c).values():
            used = self.memory_words().get(info.name)
            if used is not None:
                lines.append(f"{info.name:<13} {used:>6} of {info.depth} words")
        if self.stages:
            lines.append(f"runs in {len(self.stages)} stages (the most any takes above): "
                         f"each run writes their instructions, weights and parameters, "
                         f"{self.stage_words_per_run()} host words "
                         f"({self.stage_upload_bytes()} bytes over the link)")
            for number in range(len(self.stages)):
                names = [layer["name"] for layer in self.layers
                         if number in layer.get("stages", ())]
                lines.append(f"  stage {number}: {names[0]}"
                             + (f" to {names[-1]}" if len(names) > 1 else ""))
        per_inference = self.estimated_cycles / self.batch
        ideal = self.macs_per_inference / c.macs_per_cycle
        lines.append(f"estimated cycles per run {self.estimated_cycles} "
                     f"({per_inference:.1f} per inference, ideal {ideal:.1f}, "
                     f"utilization {ideal / per_inference:.3f})")
        work = self.unit_work()
        if work:
            lines.append(f"the units' work per run: the array streams "
                         f"{work['array_cycles']} cycles (utilization "
                         f"{work['array_bound_utilization']:.3f} if it never waited), the "
                         f"weight loader {work['load_cycles']}, the requantizer "
                         f"{work['requant_cycles']}"
                         + (f", the rescale tables {work['table_cycles']}"
                            if "table_cycles" in work else ""))
        return "\n".join(lines)

    def unit_keys(self) -> list[str]:
        """The unit columns every layer row has (programs compiled before they were kept
        have none, or not the tables'); the tables' only on an NPU with them."""
        keys = [key for key in UNIT_KEYS
                if self.layers and all(key in layer for layer in self.layers)]
        if keys[:3] != list(UNIT_KEYS[:3]):
            return []
        return keys if self.config.rescale_tables else keys[:3]

    def unit_work(self) -> dict[str, Any]:
        """The layer table's unit columns (:meth:`unit_keys`) summed (cycles per run),
        and ``array_bound_utilization``: the utilization if the array never waited, the
        ceiling of the model's mapping onto the array. Empty for a program compiled
        before the layer table had those columns."""
        keys = self.unit_keys()
        if not keys:
            return {}
        work = {key: sum(layer[key] for layer in self.layers) for key in keys}
        array = work["array_cycles"] / self.batch
        work["array_bound_utilization"] = round(
            self.macs_per_inference / (array * self.config.macs_per_cycle), 4) if array else 0.0
        return work


def _digest(preamble: bytes, rest: bytes) -> bytes:
    return hashlib.sha256(preamble + rest).digest()


def _segments(header: dict[str, Any], data: bytes, body: int):
    """(segment entry, its bytes) per segment of the header's table; raises
    ProgramFormatError for a segment past the end of the file or failing its CRC-32."""
    for seg in header["segments"]:
        start, end = body + seg["offset"], body + seg["offset"] + seg["bytes"]
        if end > len(data):
            raise ProgramFormatError(f"the file is truncated: segment {seg['region']} ends "
                                     f"at byte {end}, the file has {len(data)}")
        blob = data[start:end]
        if zlib.crc32(blob) != seg["crc32"]:
            raise ProgramFormatError(f"segment {seg['region']} is corrupt (CRC-32 mismatch)")
        yield seg, blob


def _damage(data: bytes, body: int) -> str:
    """Where a file that failed its checksum is damaged, as far as its parts tell."""
    if len(data) < body:
        return (f"; the file is truncated: its header has {max(len(data) - _BODY, 0)} of "
                f"{body - _BODY} bytes")
    try:
        for _ in _segments(json.loads(data[_BODY:body]), data, body):
            pass
    except ProgramFormatError as error:
        return f"; {error}"
    except (ValueError, KeyError, TypeError):
        return " (the header is damaged)"
    segments = json.loads(data[_BODY:body])["segments"]
    end = body + max((seg["offset"] + seg["bytes"] for seg in segments), default=0)
    if len(data) > end:
        return (f"; {len(data) - end} bytes follow its last segment (byte {end} on: the file "
                f"was appended to)")
    return " (in the header or the checksum itself)"
