"""`NpuConfig`: the one set of parameters from which the hardware, the identity block,
the compiler's limits and the docs are derived."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .layouts import param_lane_fields
from .timing import requant_product_cycles

__all__ = ["NpuConfig", "BOOL_FIELDS", "DATAFLOWS", "ROUNDINGS", "read_toml", "check_config_type"]


def read_toml(path: str | Path, what: str, example: str = "") -> dict[str, Any]:
    """A TOML file's contents; ``ValueError`` naming ``what`` and the path if it is missing,
    a directory, unreadable or not TOML (``example``: a file to point at)."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {str(path)!r} is a directory; give a .toml file"
                         f"{f' ({example} is an example)' if example else ''}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {what} {str(path)!r}: "
                         f"{getattr(error, 'strerror', None) or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{what} {str(path)!r} is not valid TOML: {error}") from None

#: Supported dataflows, in the order of their identity-block code.
DATAFLOWS = ("ws",)
#: The requantizer's roundings, in the order of their identity-block code. Each REQUANT
#: chooses one (its ``single_rounding`` field): double is the TFLite/gemmlowp reference (a
#: rounding doubling high multiply, then a rounding shift), single rounds once (TFLite's
#: TFLITE_SINGLE_ROUNDING, its FULLY_CONNECTED; onnxruntime's float requantization).
#: ``both`` builds a requantizer that does either; ``double`` and ``single`` a leaner one
#: that does only that one, and programs asking for the other are refused.
ROUNDINGS = ("double", "single", "both")

#: Widest memory address the 16-bit ISA address fields can name.
MAX_DEPTH = 1 << 16
#: A memory depth that is not a power of two is a multiple of this: whole block RAMs of
#: the common shapes (ECP5 DP16KD 512×36, iCE40 EBR 256×16), and no address decoding of
#: odd sizes. It lets a memory hold a model's 3,336 words in 3,584 rather than 4,096.
DEPTH_STEP = 256


#: The NpuConfig fields that are true or false.
BOOL_FIELDS = ("feature_maps", "requant_overlap", "load_skew", "max_pooling", "adds",
               "activity_counters", "link_error_counters", "row_broadcast",
               "single_port_activations", "depthwise_tap_row", "rescale_tables")


def _check_int(name: str, value: Any, low: int, high: int, rule: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be {rule or f'between {low} and {high}'}, not {value!r}")


@dataclass(frozen=True)
class NpuConfig:
    """Parameters of one generated NPU.

    Memory depths count words: an activation word holds ``rows`` inputs, a weight word
    ``cols`` weights, an accumulator word ``cols`` accumulators, a parameter word
    ``requant_lanes`` channels' (bias, multiplier, shift). ``requant_lanes`` (channels
    requantized a cycle) defaults to the largest divisor of gcd(rows, cols) up to 8.

    Raises ``TypeError``/``ValueError`` naming the parameter, its value and the rule.
    """

    rows: int = 8
    cols: int = 8
    input_width: int = 8
    weight_width: int = 8
    accumulator_width: int = 32
    activation_depth: int = 4096
    weight_depth: int = 4096
    accumulator_depth: int = 1024
    instruction_depth: int = 1024
    param_depth: int = 256
    requant_lanes: int | None = None  # None: the largest divisor of gcd(rows, cols) <= 8
    dataflow: str = "ws"
    rounding: str = "both"    # what REQUANT's single_rounding may ask for (ROUNDINGS)
    feature_maps: bool = True   # address walks, max pooling, add: what CNNs need
    # A second accumulator read port, so that a REQUANT with `overlap` runs beside the
    # array's next steps (the compiler then alternates accumulator halves)
    requant_overlap: bool = False
    # The depthwise mode's line buffers (docs/ARCHITECTURE.md): input rows of up to this
    # many words (a map's pitch, halo included) stream through the array with kernel taps
    # in the rows and channels in the columns. 0: no depthwise mode.
    line_buffer_depth: int = 0
    # Column c of the array shifts its weights in c cycles after column 0, as the
    # activations reach it, so a bank may be loaded again once its last word has passed
    # the bottom row rather than the last column (sw/timing.py, weight_use_cycles). It
    # costs cols·(cols−1)/2 registers of a weight and two bits; false broadcasts the load.
    load_skew: bool = True
    # With feature_maps: max pooling's combine in the accumulate path (MATMUL ``combine``),
    # and the add's path back into the accumulators (REQUANT ``to_acc``, ``left_shift``,
    # SETOUT ``from_map``: residual connections). false leaves their logic out (a UP5K
    # needs the cells) and refuses models with max pooling or adds.
    max_pooling: bool = True
    adds: bool = True
    # 0: each requantizer lane multiplies in DSP blocks (three, or four on iCE40), a channel
    # a cycle. k: in logic instead, k bits of the accumulator a cycle, so a lane takes a
    # channel every ceil(accumulator_width / k) cycles and no DSP block (a UP5K gives its
    # eight to the array). Not with the adds' REQUANT to_acc.
    requant_serial_bits: int = 0
    # The busy_cycles, macs and stall_cycles counters (hw/counters.py); false keeps only
    # cycles (and UPTIME): the others then read as absent (None), not as zero.
    activity_counters: bool = True
    # The board link's seven 16-bit error counters (LINK_STATUS); false keeps only the
    # error flag, and LINK_STATUS answers with no words.
    link_error_counters: bool = True
    # Weight registers per PE. 2: a tile loads into one bank while the other computes. 1:
    # one register (a UP5K needs the cells); programs are unchanged (the hardware, golden
    # model and cycle model read every bank field as 0, so the issue rules serialize each
    # LOADW behind the MATMULs before it), and a layer of many K tiles pays each load.
    weight_banks: int = 2
    # Each row's activation reaches all its columns in the same cycle instead of one column
    # a cycle: no activation registers between the columns, no output deskew and no load
    # skew (a UP5K needs the cells), and results cols - 1 cycles sooner; each activation
    # then drives the whole row (fine for a small array, not for a 16-wide one).
    row_broadcast: bool = False
    # The activation memory is never read and written in the same cycle, so that it may be
    # one single-port RAM (the UP5K's SPRAM, hw/ram.py; a single-port SRAM macro towards
    # silicon): a FILL waits for the feeder's last read and nothing dispatches beside it.
    # Not with requant_overlap, whose REQUANT writes beside the feeder's reads.
    single_port_activations: bool = False
    # The weight memory in this many parts, read together: column segments of
    # rows / weight_segments rows each take their part's words at once, so a tile loads in
    # rows / weight_segments cycles instead of rows (a batch-1 dense layer streams one word
    # a tile and is bound by the load). A power of two dividing rows (a power of two).
    weight_segments: int = 1
    # One more row of PEs below an array whose rows stop one short of a group of three (5
    # or 8 rows), used only by the depthwise mode: on an 8×8 its two groups and two rows
    # become three groups, so a 3×3 depthwise kernel takes one pass instead of two. Its
    # weights come from the bank's previous tile (SETGEMM tap_row, docs/ARCHITECTURE.md).
    depthwise_tap_row: bool = False
    # Two tables of 2^input_width accumulator-wide entries beside the accumulate path, one
    # copy per column: an add's input rescale (TFLite's Add: an int8 value shifted left
    # and rescaled) is a function of the input's int8 value alone, so RESCALE looks each
    # lane up and writes a whole word a cycle into the accumulators (TABLE loads the
    # tables from parameter words). An add then takes one requantizer pass, not three.
    # Needs adds and requant_overlap on a square array.
    rescale_tables: bool = False

    def __post_init__(self) -> None:
        _check_int("rows", self.rows, 1, 64)
        _check_int("cols", self.cols, 1, 64)
        _check_int("input_width", self.input_width, 2, 16)
        _check_int("weight_width", self.weight_width, 2, 16)
        _check_int("accumulator_width", self.accumulator_width, 16, 32)
        low_acc = self.input_width + self.weight_width
        if self.accumulator_width < low_acc:
            raise ValueError(
                f"accumulator_width must be at least input_width + weight_width "
                f"({low_acc}), not {self.accumulator_width}")
        for name in ("activation_depth", "weight_depth", "accumulator_depth",
                     "instruction_depth", "param_depth"):
            value = getattr(self, name)
            rule = (f"a power of two from 2 to {MAX_DEPTH}, or a multiple of "
                    f"{DEPTH_STEP} up to it")
            _check_int(name, value, 2, MAX_DEPTH, rule)
            if value & (value - 1) and value % DEPTH_STEP:
                raise ValueError(f"{name} must be {rule}, not {value}")
        if self.weight_depth < self.rows:
            raise ValueError(
                f"weight_depth must hold one weight tile of rows={self.rows} words, "
                f"not {self.weight_depth}")
        if self.requant_lanes is None:
            common = math.gcd(self.rows, self.cols)
            object.__setattr__(self, "requant_lanes",
                               max(d for d in range(1, 9) if common % d == 0))
        _check_int("requant_lanes", self.requant_lanes, 1, 64)
        if math.gcd(self.rows, self.cols) % self.requant_lanes:
            raise ValueError(
                f"requant_lanes must divide both rows ({self.rows}) and cols ({self.cols}), "
                f"not {self.requant_lanes}")
        if self.dataflow not in DATAFLOWS:
            raise ValueError(
                f"dataflow must be one of {', '.join(map(repr, DATAFLOWS))}, "
                f"not {self.dataflow!r}")
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be true or false, not {getattr(self, name)!r}")
        _check_int("line_buffer_depth", self.line_buffer_depth, 0, 4096)
        if self.line_buffer_depth:
            if not self.feature_maps:
                raise ValueError(f"line_buffer_depth={self.line_buffer_depth} (the depthwise "
                                 "mode) needs feature_maps = true")
            if self.rows != self.cols or self.rows < 3:
                raise ValueError(
                    f"line_buffer_depth={self.line_buffer_depth} (the depthwise mode) needs a "
                    f"square array of at least 3×3, not {self.rows}×{self.cols}; set it to 0")
            if self.line_buffer_depth < 4:
                raise ValueError(f"line_buffer_depth must be 0 or at least 4, not "
                                 f"{self.line_buffer_depth}")
        _check_int("requant_serial_bits", self.requant_serial_bits, 0,
                   self.accumulator_width - 1,
                   f"0 (products in DSP blocks) or 1 to {self.accumulator_width - 1} (bits "
                   "of the accumulator a cycle)")
        if self.requant_serial_bits and self.requant_to_acc:
            raise ValueError(
                f"requant_serial_bits={self.requant_serial_bits} (a serial requantizer "
                "product) has no path back into the accumulators, which adds need; set "
                "adds = false, or requant_serial_bits = 0")
        _check_int("weight_banks", self.weight_banks, 1, 2, "1 or 2")
        _check_int("weight_segments", self.weight_segments, 1, 64)
        if self.weight_segments > 1:
            segments = self.weight_segments
            if segments & (segments - 1) or self.rows & (self.rows - 1) or self.rows % segments:
                raise ValueError(
                    f"weight_segments must be 1 or a power of two dividing rows, on an array "
                    f"whose rows are a power of two (the weight address's bits pick the "
                    f"part), not {segments} with rows = {self.rows}")
            self._refuse_one_bank_or_broadcast(f"weight_segments = {segments}",
                                           "weight_segments = 1")
        if self.depthwise_tap_row:
            if not self.line_buffer_depth or self.rows not in (5, 8):
                raise ValueError(
                    f"depthwise_tap_row = true completes the depthwise mode's last group of "
                    f"three rows: it needs line_buffer_depth > 0 and 5 or 8 rows, not "
                    f"line_buffer_depth = {self.line_buffer_depth} with {self.rows} rows; set "
                    f"depthwise_tap_row = false")
            self._refuse_one_bank_or_broadcast("depthwise_tap_row = true",
                                           "depthwise_tap_row = false")
        if self.rescale_tables and not (self.requant_to_acc and self.requant_overlap
                                        and self.rows == self.cols):
            raise ValueError(
                f"rescale_tables = true (an add's inputs rescaled by table lookup) needs "
                f"feature_maps, adds and requant_overlap on a square array, not "
                f"feature_maps = {str(self.feature_maps).lower()}, adds = "
                f"{str(self.adds).lower()}, requant_overlap = "
                f"{str(self.requant_overlap).lower()} on {self.rows}×{self.cols}; set "
                f"rescale_tables = false")
        if self.rescale_tables and self.input_width > 8:
            raise ValueError(
                f"rescale_tables = true keeps 2^input_width entries a table in each column: "
                f"at most 8-bit inputs, not input_width = {self.input_width}; set "
                f"rescale_tables = false")
        if self.rescale_tables and self.param_depth < self.table_param_words:
            raise ValueError(
                f"rescale_tables = true loads its tables from {self.table_param_words} "
                f"parameter words ({self.table_entries} entries over {self.requant_lanes} "
                f"lanes), param_depth is {self.param_depth}; raise param_depth or set "
                f"rescale_tables = false")
        if self.row_broadcast and self.load_skew:
            raise ValueError("row_broadcast = true (every column takes its row's activation in "
                             "the same cycle) loads every column at once: set load_skew = false")
        if self.single_port_activations and self.requant_overlap:
            raise ValueError("single_port_activations = true (the activation memory is never "
                             "read and written in the same cycle) cannot go with "
                             "requant_overlap = true, whose REQUANT writes beside the "
                             "feeder's reads: set requant_overlap = false")
        if self.rounding not in ROUNDINGS:
            raise ValueError(
                f"rounding must be one of {', '.join(map(repr, ROUNDINGS))}, "
                f"not {self.rounding!r}")

    def _refuse_one_bank_or_broadcast(self, option: str, fix: str) -> None:
        """Refuse ``option`` (a load scheme of the weight registers) with one weight bank
        or row_broadcast, which load them otherwise."""
        if self.weight_banks == 1 or self.row_broadcast:
            what = "weight_banks = 1" if self.weight_banks == 1 else "row_broadcast"
            raise ValueError(f"{option} cannot go with {what}: set {fix}")

    # Derived quantities -------------------------------------------------------------

    @property
    def skew_cols(self) -> int:
        """Columns an activation word passes one a cycle: ``cols``, or 1 with
        ``row_broadcast`` (the ``cols`` of sw/timing.py's formulas)."""
        return 1 if self.row_broadcast else self.cols

    @property
    def load_rows(self) -> int:
        """Rows of each column segment: the cycles a weight tile's load takes (``rows``
        unless ``weight_segments``), the ``rows`` of sw/timing.py's load formulas."""
        return self.rows // self.weight_segments

    @property
    def paired_loads(self) -> bool:
        """Whether a GEMM's LOADW may dispatch in the cycle of the MATMUL of the K tile
        before it, and the LOADW of a bank in the cycle its last word issues: with
        ``weight_segments`` = ``rows`` (a tile loads in a cycle) and the load skew (a word
        has left a bank's rows as the load reaches them), so that a batch-1 dense layer
        runs a K tile a cycle."""
        return self.weight_segments > 1 and self.load_rows == 1 and self.load_skew

    @property
    def array_rows(self) -> int:
        """Rows of PEs a word's partial sums pass: ``rows``, and the depthwise tap row
        (``depthwise_tap_row``), the ``rows`` of sw/timing.py's array latency."""
        return self.rows + self.depthwise_tap_row

    @property
    def depthwise_groups(self) -> int:
        """Kernel rows a depthwise-mode MATMUL covers (0: no depthwise mode): rows 3g to
        3g + 2 of the array (the tap row, ``depthwise_tap_row``, below the last) hold
        kernel row g's three taps, at most three such groups."""
        return min(self.array_rows // 3, 3) if self.line_buffer_depth else 0

    @property
    def max_combine(self) -> bool:
        """Whether a MATMUL may combine by max (max pooling): ``feature_maps`` and
        ``max_pooling``."""
        return self.feature_maps and self.max_pooling

    @property
    def requant_to_acc(self) -> bool:
        """Whether a REQUANT may go ``to_acc`` with ``left_shift`` (the add):
        ``feature_maps`` and ``adds``."""
        return self.feature_maps and self.adds

    @property
    def requant_from_map(self) -> bool:
        """Whether a REQUANT ``to_acc`` can read its source from an activation map (SETOUT
        ``from_map``) instead of the accumulators: NPUs generated with ``requant_overlap``
        and the feature-map hardware with ``adds``, on a square array (an activation
        word's lanes are then an accumulator word's columns) with a requantizer lane per
        column (the word goes to the lanes whole: a group multiplexer after the
        activations' block RAM took the ULX3S-25F's 8×8 with one lane from 81 MHz to 68).
        An add then takes three requantizer passes and none through the array."""
        return (self.requant_to_acc and self.requant_overlap and self.rows == self.cols
                and self.requant_lanes == self.cols)

    @property
    def table_entries(self) -> int:
        """Entries of each rescale table (``rescale_tables``): one per input value."""
        return 1 << self.input_width

    @property
    def table_param_words(self) -> int:
        """Parameter words TABLE reads: lane j of word k holds entry k·requant_lanes + j
        of both tables (``layouts.TABLE_FIELDS``)."""
        return -(-self.table_entries // self.requant_lanes)

    @property
    def table_load_cycles(self) -> int:
        """Cycles TABLE writes: each parameter word's lanes for table 0, then for table 1,
        one entry a cycle (lanes past the last entry are skipped, not saved)."""
        return 2 * self.table_param_words * self.requant_lanes

    @property
    def requant_product_cycles(self) -> int:
        """Cycles a requantizer lane takes per channel (1 unless ``requant_serial_bits``)."""
        return requant_product_cycles(self.accumulator_width, self.requant_serial_bits)

    @property
    def macs_per_cycle(self) -> int:
        return self.rows * self.cols

    @property
    def activation_word_width(self) -> int:
        return self.rows * self.input_width

    @property
    def weight_word_width(self) -> int:
        return self.cols * self.weight_width

    @property
    def accumulator_word_width(self) -> int:
        return self.cols * self.accumulator_width

    @property
    def param_lane_width(self) -> int:
        """Bits of one channel's post-processing parameters (``layouts.PARAM_LANE_FIELDS``)."""
        return sum(f.width for f in param_lane_fields(self.accumulator_width))

    @property
    def param_word_width(self) -> int:
        return self.requant_lanes * self.param_lane_width

    # Serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> NpuConfig:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"{source}: unknown parameter(s) {', '.join(unknown)}; "
                f"known: {', '.join(cls.field_names())}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> NpuConfig:
        """Load a config from a TOML file: top-level keys or an ``[npu]`` table."""
        return cls.from_dict(cls.toml_values(path), source=str(path))

    @staticmethod
    def toml_values(path: str | Path) -> dict[str, Any]:
        """The raw parameters of a TOML config file (not yet validated)."""
        data = dict(read_toml(path, "config file"))
        table = data.pop("npu", None)
        if isinstance(table, dict):   # top-level keys and an [npu] table, merged
            twice = sorted(name for name in table if name in data and data[name] != table[name])
            if twice:
                raise ValueError(f"config file {str(path)!r} gives {', '.join(twice)} both at "
                                 f"the top level and in its [npu] table, differently; keep one")
            data.update(table)
        elif table is not None:
            data["npu"] = table   # not a table: refused by name as an unknown field
        return data

    def replace(self, **changes: Any) -> NpuConfig:
        return dataclasses.replace(self, **changes)

    def digest(self) -> str:
        """A short stable hash of every field; names build folders."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def describe(self) -> str:
        text = (f"{self.rows}x{self.cols} {self.dataflow}, int{self.input_width} x "
                f"int{self.weight_width} -> int{self.accumulator_width}")
        if self.rounding != "both":
            text += f", {self.rounding} rounding only"
        if self.requant_overlap:
            text += ", requant overlap"
        if self.line_buffer_depth:
            text += f", depthwise mode (rows of {self.line_buffer_depth}"
            text += ", a tap row)" if self.depthwise_tap_row else ")"
        if self.rescale_tables:
            text += ", rescale tables"
        if self.row_broadcast:
            text += ", activations broadcast along the rows"
        elif not self.load_skew:
            text += ", no load skew"
        if self.feature_maps and not self.max_pooling:
            text += ", no max pooling"
        if self.feature_maps and not self.adds:
            text += ", no adds"
        if not self.activity_counters:
            text += ", cycles counter only"
        if not self.link_error_counters:
            text += ", no link error counters"
        if self.weight_banks == 1:
            text += ", one weight bank"
        if self.weight_segments > 1:
            text += (f", weights loaded in {self.weight_segments} segments "
                     f"({self.load_rows} cycle{'s' if self.load_rows > 1 else ''} a tile)")
        if self.single_port_activations:
            text += ", single-port activations"
        if self.requant_serial_bits:
            text += (f", serial requantizer product ({self.requant_serial_bits} bits a cycle, "
                     f"{self.requant_product_cycles} cycles a channel)")
        return text + ("" if self.feature_maps else ", no feature maps")


def check_config_type(config: object) -> NpuConfig:
    """``config`` if it is an :class:`NpuConfig` (what every gateware unit is generated
    from); raises ``TypeError`` naming what it is instead."""
    if not isinstance(config, NpuConfig):
        raise TypeError(f"config must be an NpuConfig, not {config!r}")
    return config
