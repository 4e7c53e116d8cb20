"""Feature-map operators as NPU instructions: convolution (implicit im2col), depthwise
convolution, max and average pooling, global average pooling, and the elementwise add of
two maps (residual connections) in TFLite's int8 arithmetic.

Every operator is a set of *output tiles*: ``cols`` output channels, each a GEMM whose K
tiles walk kernel taps (SETKERN) and input-channel tiles (SETGEMM ``tile_step``) over the
input map in place, with a strided walk over the output pixels (SETWIN), followed by a
REQUANT that writes the tile into the output map (SETOUT). No im2col copy is made.

- A convolution's output tile ``n`` holds channels ``n·cols ...``; its K tiles are every
  tap of every input-channel tile, and the array is fully used.
- A per-channel operator (depthwise convolution, pooling) maps channel ``c`` of the input
  to column ``c`` of a diagonal weight tile: output tile (t, j) holds the ``cols``
  channels from ``t·rows + j·cols`` on, and only one product per column is useful, so the
  array runs at 1/max(rows, cols) of its MACs. Max pooling keeps the larger value
  (MATMUL ``combine``), global average pooling sums every pixel into one accumulator
  word (SETWIN ``reduce``).

The add passes each input through the array (identity weights), rescales it into the
accumulators (REQUANT ``to_acc`` with ``left_shift``: (q − z)·2^20 times the input's
multiplier, as TFLite does), sums the two there and requantizes the sum.

Output pixels are processed in chunks of whole rows that fit the accumulator memory.

A 1×1 convolution whose pixels are contiguous words (stride 1, no halos) and whose output
tiles all fit the accumulators is a plain GEMM while the walk registers hold a start's
contiguous walks (no SETKERN, SETWIN or SETOUT before it): it is emitted as
:func:`npugen.schedule.gemm_instructions` schedules a GEMM (one SETGEMM, a GEMM per output
tile), then a REQUANT per tile, with none of the walk instructions that NPUs without
feature-map hardware lack. A dense layer on a batch of vectors (an MLP's) is one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np

from .arith import requantize_raw
from .config import NpuConfig
from .featuremap import FeatureMap, conv_output_size, stride_pair
from .golden import CycleModel, depthwise_lead, expand_program
from .isa import FORMATS, Instruction, Opcode
from .schedule import DoesNotFit, GemmPlan, ceil_div, gemm_instructions, next_bank

__all__ = ["Requant", "Rescale", "Lowering"]

#: The instructions that set the walks of GEMM, MATMUL and REQUANT (a start resets them to
#: contiguous words and a 1×1 kernel).
_WALK_OPCODES = (Opcode.SETKERN, Opcode.SETWIN, Opcode.SETOUT)
#: The most results a depthwise-mode MATMUL drops a row (SETWIN ``drop``).
_MAX_DROP = next(f.high for f in FORMATS[Opcode.SETWIN] if f.name == "drop")
#: FILL's fields by name.
_FILL_FIELDS = {f.name: f for f in FORMATS[Opcode.FILL]}


def _fill(value: int, out_addr: int, count: int, row_length: int, row_step: int) -> Instruction:
    return Instruction(Opcode.FILL, {"value": value, "out_addr": out_addr, "count": count,
                                     "row_length": row_length, "row_step": row_step})


@dataclass(frozen=True)
class Requant:
    """Post-processing of one operator: per output channel bias, Q31 multiplier and right
    shift; the output zero point and clamp bounds."""

    bias: np.ndarray
    multiplier: np.ndarray
    shift: np.ndarray
    zero_point: int
    clamp_min: int = -128
    clamp_max: int = 127
    single_rounding: int = 0   # REQUANT single_rounding: 1 rounds once, 0 twice
    ties_to_even: int = 0      # REQUANT ties_to_even: with one rounding, halves to even

    def lanes(self, channels: np.ndarray) -> np.ndarray:
        """(bias, multiplier, shift) for each channel index (zeros past the last)."""
        out = np.zeros((len(channels), 3), dtype=np.int64)
        valid = channels < len(self.bias)
        for index, values in enumerate((self.bias, self.multiplier, self.shift)):
            out[valid, index] = np.asarray(values, dtype=np.int64)[channels[valid]]
        return out


@dataclass(frozen=True)
class Rescale:
    """One input of an add: its zero point and the Q31 multiplier and right shift that
    bring (q − zero_point)·2^20 to the common scale."""

    zero_point: int
    multiplier: int
    shift: int


def _chunk_words(src: FeatureMap, dst: FeatureMap, rows: int, reduce: bool, depthwise: bool,
                 lead: int, pitch: int | None = None) -> tuple[int, int]:
    """Activation words a chunk of ``rows`` output rows streams, and accumulator words
    it writes: the whole input into one word (reduce), the depthwise mode's lead and
    ``pitch`` words a row but the last (a word per output pixel; the stream's pitch,
    ``src.pitch`` unless it walks a phase of the map), or a word per output pixel."""
    if reduce:
        return src.height * src.width, 1
    if depthwise:   # the results of the rows' last pitch − dst.width words dropped
        pitch = src.pitch if pitch is None else pitch
        return lead + (rows - 1) * pitch + dst.width, rows * dst.width
    return rows * dst.width, rows * dst.width


def _balanced_chunks(height: int, most: int) -> list[tuple[int, int]]:
    """(first row, rows) of the fewest chunks of at most ``most`` rows that cover
    ``height`` rows, their sizes a row apart at most (a short last chunk would wait for
    the long one before it)."""
    count = ceil_div(height, most)
    sizes = [height // count + (index < height % count) for index in range(count)]
    starts = np.cumsum([0, *sizes[:-1]])
    return [(int(y0), rows) for y0, rows in zip(starts, sizes, strict=True)]


def _spread_fills(fills: list[Instruction], parts: int) -> list[Instruction]:
    """``fills`` cut at row boundaries into FILLs of about 1/``parts`` of their words
    each, so that ``parts`` GEMMs can each hide one."""
    total = sum(ins["count"] for ins in fills)
    most = max(1, -(-total // max(parts, 1)))
    pieces = []
    for ins in fills:
        length, step = ins["row_length"], ins["row_step"]
        per = most if length == 0 else max(1, most // length) * length
        for start in range(0, ins["count"], per):
            offset = start if length == 0 else start // length * step
            pieces.append(_fill(ins["value"], ins["out_addr"] + offset,
                                min(per, ins["count"] - start), length, step))
    return pieces


@dataclass
class _OutTile:
    weights: np.ndarray     # (k_tiles · rows, cols)
    channels: np.ndarray    # output channel of each column (≥ C: unused)
    src_tile: int           # input-channel tile the K walk starts at
    dst_channel: int        # output channel of column 0


@dataclass
class Lowering:
    """Emits the instructions, weight words and parameter words of a sequence of
    operators; tracks the weight bank the next K tile uses."""

    config: NpuConfig
    weight_base: int = 0
    param_base: int = 0
    instructions: list[Instruction] = field(default_factory=list)
    weight_words: list[np.ndarray] = field(default_factory=list)
    param_words: list[np.ndarray] = field(default_factory=list)
    bank: int = 0
    weight_end: int = 0
    param_end: int = 0
    _zero_params: int | None = None   # parameter words of multiplier 0 (fill_halo)
    _pending_fills: list[Instruction] = field(default_factory=list)   # fill_halo's FILLs
    check_depths: bool = True   # False: go on past full memories (to report every need)
    # Where an operator put an instruction among those before it (an add's TABLE), in order.
    insertions: list[int] = field(default_factory=list)
    # The GEMMs :meth:`_emit` emits load a tile for the depthwise tap row first (SETGEMM
    # tap_row); each _emit sets it.
    _tap_row: bool = False

    def __post_init__(self) -> None:
        self.weight_end, self.param_end = self.weight_base, self.param_base

    # -- operators ---------------------------------------------------------------------

    def conv(self, src: FeatureMap, dst: FeatureMap, weight: np.ndarray, requant: Requant,
             stride: int | tuple[int, int] = 1,
             pads: tuple[int, int, int, int] = (0, 0, 0, 0),
             out_tiles: range | None = None) -> None:
        """``dst = requant(conv(src, weight))``; weight is (kh, kw, C_in, C_out) int.
        ``out_tiles``: only these output tiles (of ``cols`` channels; a part of a layer
        split across the stages of a program, on an NPU with the feature-map hardware)."""
        c = self.config
        kh, kw, c_in, c_out = weight.shape
        self._check_maps(src, dst, c_in, c_out, (kh, kw), stride, pads)
        in_tiles = ceil_div(c_in, c.rows)
        padded = np.zeros((kh, kw, in_tiles * c.rows, ceil_div(c_out, c.cols) * c.cols),
                          dtype=np.int64)
        padded[:, :, :c_in, :c_out] = weight
        # K tile order: tap x fastest, then tap y, then input-channel tile.
        k_major = padded.reshape(kh, kw, in_tiles, c.rows, -1).transpose(2, 0, 1, 3, 4)
        k_major = k_major.reshape(in_tiles * kh * kw * c.rows, -1)
        tiles = [_OutTile(k_major[:, n * c.cols:(n + 1) * c.cols],
                          n * c.cols + np.arange(c.cols), 0, n * c.cols)
                 for n in range(ceil_div(c_out, c.cols))]
        if out_tiles is not None:
            if not c.feature_maps:
                raise ValueError("a part of a layer's output tiles needs the feature-map "
                                 "hardware")
            tiles = tiles[out_tiles.start:out_tiles.stop]
        if out_tiles is None and self._plain_gemm(src, dst, (kh, kw), stride, pads,
                                                  len(tiles)):
            self._emit_gemm(src, dst, tiles, requant)
        else:
            self._emit(src, dst, tiles, requant, (kh, kw), stride, pads,
                       k_tiles=in_tiles * kh * kw)

    def depthwise(self, src: FeatureMap, dst: FeatureMap, weight: np.ndarray,
                  requant: Requant, stride: int | tuple[int, int] = 1,
                  pads: tuple[int, int, int, int] = (0, 0, 0, 0), *,
                  combine_max: bool = False,
                  pixel_requants: tuple[np.ndarray, dict[int, Requant]] | None = None
                  ) -> bool:
        """Per-channel ``dst = requant(Σ_taps src · weight)`` (max over the taps when
        ``combine_max``); weight is (kh, kw, C) int. Pooling is this with weights 1.
        ``pixel_requants``: (key of each output pixel (H, W), requant of each key), for
        outputs whose requantization differs by pixel (average pooling whose border
        windows hold fewer pixels). True when it runs in the array's depthwise mode."""
        kh, kw, channels = weight.shape
        self._check_maps(src, dst, channels, channels, (kh, kw), stride, pads)
        if (self._phase_mode(dst, (kh, kw), stride) and not combine_max
                and pixel_requants is None):
            # Stride 2: the four phases of the map (even and odd rows and columns) as
            # stride-1 windows of the depthwise mode, against the diagonal tiles.
            return self._cheaper(
                lambda low: low._emit(src, dst, low._phase_tiles(weight), requant, (kh, kw),
                                      stride, pads, k_tiles=4, depthwise=True, phased=True),
                lambda low: low._diagonal(src, dst, weight, requant, stride, pads)) == 0
        if (self._depthwise_mode(src, dst, (kh, kw), stride) and not combine_max
                and pixel_requants is None):
            # The depthwise mode makes a column's nine products a cycle, but streams
            # src.pitch words a row and a lead: where the requantizer is the bottleneck
            # the diagonal tiles below can be faster. The cycle model picks.
            return self._cheaper(
                lambda low: low._emit(src, dst, low._depthwise_mode_tiles(weight), requant,
                                      (kh, kw), stride, pads,
                                      k_tiles=low._depthwise_passes(), depthwise=True),
                lambda low: low._diagonal(src, dst, weight, requant, stride, pads)) == 0
        self._diagonal(src, dst, weight, requant, stride, pads, combine_max=combine_max,
                       pixel_requants=pixel_requants)
        return False

    def _diagonal(self, src: FeatureMap, dst: FeatureMap, weight: np.ndarray,
                  requant: Requant, stride: int | tuple[int, int],
                  pads: tuple[int, int, int, int], *, combine_max: bool = False,
                  pixel_requants: tuple[np.ndarray, dict[int, Requant]] | None = None
                  ) -> None:
        """A per-channel operator on diagonal weight tiles, one tap per K tile."""
        c = self.config
        kh, kw, channels = weight.shape
        tiles = []
        for tile in range(ceil_div(channels, c.rows)):
            for first in range(0, c.rows, c.cols):
                if tile * c.rows + first >= channels:
                    break
                diagonal = np.zeros((kh * kw, c.rows, c.cols), dtype=np.int64)
                for col in range(c.cols):
                    lane, channel = first + col, tile * c.rows + first + col
                    if lane < c.rows and channel < channels:
                        diagonal[:, lane, col] = weight[:, :, channel].reshape(-1)
                tiles.append(_OutTile(diagonal.reshape(-1, c.cols),
                                      tile * c.rows + first + np.arange(c.cols), tile,
                                      tile * c.rows + first))
        self._emit(src, dst, tiles, requant, (kh, kw), stride, pads, k_tiles=kh * kw,
                   combine_max=combine_max, pixel_requants=pixel_requants)

    def _cheaper(self, *emitters) -> int:
        """Run the emitter (a function of a Lowering) whose instructions take the fewest
        cycles in the cycle model, and return its index; the others leave no trace. One
        that does not fit (``DoesNotFit``) is left out, unless none fits."""
        best, best_cycles, refusal, chosen = None, None, None, -1
        for index, emit in enumerate(emitters):
            trial = copy.copy(self)
            trial.instructions, trial.weight_words = [], list(self.weight_words)
            trial.param_words = list(self.param_words)
            trial._pending_fills = list(self._pending_fills)
            try:
                emit(trial)
            except DoesNotFit as error:
                refusal = error
                continue
            timing = CycleModel(self.config)
            for step in expand_program(self.config,
                                       [*trial.instructions, Instruction(Opcode.HALT)]):
                timing.dispatch(step)
            if best_cycles is None or timing.counters.cycles < best_cycles:
                best, best_cycles, chosen = trial, timing.counters.cycles, index
        if best is None:
            raise refusal
        best.instructions = self.instructions + best.instructions
        self.__dict__.update(best.__dict__)
        return chosen

    def _depthwise_mode(self, src: FeatureMap, dst: FeatureMap, kernel: tuple[int, int],
                        stride: int | tuple[int, int]) -> bool:
        """Whether a per-channel operator runs in the array's depthwise mode: a 3×3
        kernel, stride 1, on an NPU with line buffers that hold the input's rows, and no
        more than ``_MAX_DROP`` words a row past the output's."""
        return (bool(self.config.line_buffer_depth) and kernel == (3, 3)
                and stride_pair(stride) == (1, 1)
                and 4 <= src.pitch <= self.config.line_buffer_depth
                and src.pitch - dst.width <= _MAX_DROP)

    def _phase_mode(self, dst: FeatureMap, kernel: tuple[int, int],
                    stride: int | tuple[int, int]) -> bool:
        """Whether a per-channel operator may run in the depthwise mode by phases: a 3×3
        kernel, stride 2, on an NPU with line buffers that hold a phase row (the output
        width + 2 words) and two groups of rows at least (the even phases' windows are two
        phase rows high)."""
        return (self.config.depthwise_groups >= 2 and kernel == (3, 3)
                and stride_pair(stride) == (2, 2)
                and 4 <= dst.width + 2 <= self.config.line_buffer_depth)

    def _phase_tiles(self, weight: np.ndarray) -> list[_OutTile]:
        """The phase mode's weight tiles: per channel tile (lane c is channel t·rows + c),
        one K tile per phase of the map, K tile k for the rows of parity py = 1 − k div 2
        and the columns of parity px = 1 − k mod 2 (SETKERN 2×2: its stream starts
        (1 − py) rows and 1 − px columns after phase (1, 1)'s). Row 3g + j holds the tap
        of kernel row 2(amax − g) + py and column 2(bmax − j) + px, amax = 1 − py and
        bmax = 1 − px the phase's last tap (row and column of the phase), where those are
        0 or more; the stride-1 window of the phase ends at that tap."""
        c = self.config
        channels = weight.shape[2]
        tiles = []
        for tile in range(ceil_div(channels, c.rows)):
            stacked = np.zeros((4, c.rows, c.cols), dtype=np.int64)
            lanes = min(c.cols, channels - tile * c.rows)
            for k in range(4):
                py, px = 1 - k // 2, 1 - k % 2
                for g in range(c.depthwise_groups):
                    for j in range(3):
                        a, b = (1 - py) - g, (1 - px) - j
                        if a >= 0 and b >= 0:
                            stacked[k, 3 * g + j, :lanes] = weight[
                                2 * a + py, 2 * b + px, tile * c.rows:tile * c.rows + lanes]
            tiles.append(_OutTile(self._with_tap_tiles(stacked),
                                  tile * c.rows + np.arange(c.cols), tile, tile * c.rows))
        return tiles

    def _depthwise_passes(self) -> int:
        """MATMULs (K tiles) a 3×3 kernel takes in the depthwise mode: G kernel rows
        each, the last pass's window ending at the kernel's last row."""
        return ceil_div(3, self.config.depthwise_groups)

    def _depthwise_mode_tiles(self, weight: np.ndarray) -> list[_OutTile]:
        """The depthwise mode's weight tiles: per channel tile (lane c is channel
        t·rows + c, rows == cols), one tile per pass, row 3g + j holding the tap of
        kernel row b − g and column 2 − j, where b is the pass's last kernel row; its
        window starts at kernel row b − G + 1 (golden.py, ``_depthwise_products``)."""
        c = self.config
        groups, passes = c.depthwise_groups, self._depthwise_passes()
        channels = weight.shape[2]
        tiles = []
        for tile in range(ceil_div(channels, c.rows)):
            stacked = np.zeros((passes, c.array_rows, c.cols), dtype=np.int64)
            lanes = min(c.cols, channels - tile * c.rows)
            for p in range(passes):
                bottom = min((p + 1) * groups, 3) - 1
                for g in range(groups):
                    if bottom - g < p * groups:
                        continue   # an earlier pass has this kernel row
                    for j in range(3):
                        stacked[p, 3 * g + j, :lanes] = weight[
                            bottom - g, 2 - j, tile * c.rows:tile * c.rows + lanes]
            tiles.append(_OutTile(self._with_tap_tiles(stacked),
                                  tile * c.rows + np.arange(c.cols), tile, tile * c.rows))
        return tiles

    def _with_tap_tiles(self, stacked: np.ndarray) -> np.ndarray:
        """The weight words of a depthwise-mode GEMM's K tiles ``stacked`` (K, rows or
        array_rows, cols). With the tap row (``depthwise_tap_row``) each K tile is its
        rows' tile, then one whose row rows − L (the last segment's top, which the first
        tile's load shifts into the tap row) is the tap row's weight (SETGEMM tap_row):
        every depthwise-mode MATMUL reads it, so it is zero where the window ends above."""
        c = self.config
        if c.depthwise_tap_row:
            tap = np.zeros((len(stacked), c.rows, c.cols), dtype=np.int64)
            if stacked.shape[1] > c.rows:
                tap[:, c.rows - c.load_rows] = stacked[:, c.rows]
            stacked = np.concatenate([stacked[:, :c.rows], tap], axis=1)
        return stacked.reshape(-1, c.cols)

    def global_sum(self, src: FeatureMap, dst: FeatureMap, requant: Requant,
                   weight: int = 1) -> None:
        """Per channel, ``dst = requant(weight · Σ_pixels src)`` into a 1×1 map: global
        average pooling when the multiplier includes 1/(H·W)."""
        c = self.config
        channels = src.channels
        self._check_maps(src, dst, channels, channels, (src.height, src.width), 1,
                         (0, 0, 0, 0))
        tiles = []
        for tile in range(ceil_div(channels, c.rows)):
            for first in range(0, c.rows, c.cols):
                if tile * c.rows + first >= channels:
                    break
                diagonal = np.zeros((c.rows, c.cols), dtype=np.int64)
                for col in range(min(c.cols, c.rows - first)):
                    diagonal[first + col, col] = weight
                tiles.append(_OutTile(diagonal, tile * c.rows + first + np.arange(c.cols),
                                      tile, tile * c.rows + first))
        channels_of = [tile.channels[tile.channels < channels] for tile in tiles]
        # Where a tile's few pixels stream faster than its weight load (GEMM's K-tile
        # bound, docs/ARCHITECTURE.md), one load for every tile.
        load_bound = src.height * src.width < 2 * c.rows + c.cols + 2
        shared = load_bound and c.rows == c.cols and len(tiles) <= c.accumulator_depth and all(
            np.array_equal(requant.lanes(own), requant.lanes(channels_of[0][:len(own)]))
            for own in channels_of)
        if not shared:
            self._emit(src, dst, tiles, requant, (1, 1), 1, (0, 0, 0, 0), k_tiles=1,
                       reduce=True)
            return
        self._cheaper(
            lambda low: low._emit(src, dst, tiles, requant, (1, 1), 1, (0, 0, 0, 0),
                                  k_tiles=1, reduce=True),
            lambda low: low._global_sums_one_requant(src, dst, tiles, requant))

    def _global_sums_one_requant(self, src: FeatureMap, dst: FeatureMap,
                                 tiles: list[_OutTile], requant: Requant) -> None:
        """:meth:`global_sum` where every channel tile has the same parameters (a pooling's
        are per tensor) on a square array: the diagonal tile loaded once, a reduce MATMUL
        per channel tile into accumulator word t back to back, one REQUANT for them all.
        Small maps (VWW's 3×3) then do not wait for a weight load per tile."""
        c = self.config
        groups = c.cols // c.requant_lanes
        identity_at = self._store_weights(tiles[0].weights)
        params_at = self._store_params(requant.lanes(tiles[0].channels).reshape(
            groups, c.requant_lanes, 3))
        ins = self.instructions
        ins.append(Instruction(Opcode.SETWIN, {
            "row_length": src.width, "row_step": src.pitch, "col_step": 1, "reduce": 1}))
        ins.append(Instruction(Opcode.LOADW, {"bank": self.bank, "weight_addr": identity_at}))
        self.flush_fills()
        for index, tile in enumerate(tiles):
            ins.append(Instruction(Opcode.MATMUL, {
                "bank": self.bank, "act_addr": src.word(tile.src_tile, 0, 0),
                "acc_addr": index, "count": src.height * src.width}))
        self.bank ^= 1
        ins += [
            Instruction(Opcode.SETPP, {"zero_point": requant.zero_point,
                                       "clamp_min": requant.clamp_min,
                                       "clamp_max": requant.clamp_max}),
            Instruction(Opcode.SETOUT, {"row_length": 1, "row_step": dst.tile_words}),
            Instruction(Opcode.SETREQ, {"param_addr": params_at,
                                        "out_stride": dst.tile_words}),
            Instruction(Opcode.REQUANT, {
                "acc_addr": 0, "count": len(tiles), "out_addr": dst.word(0, 0, 0),
                "single_rounding": requant.single_rounding,
                "ties_to_even": requant.ties_to_even})]

    def add(self, first: FeatureMap, second: FeatureMap, dst: FeatureMap,
            first_scale: Rescale, second_scale: Rescale, requant: Requant,
            by_tables: bool = True) -> None:
        """``dst = requant(rescale(first) + rescale(second))``, elementwise (TFLite's int8
        Add); ``requant`` rescales the sum (its bias is usually 0). ``by_tables=False``
        leaves an NPU's rescale tables unused (their parameter words can cost a stage)."""
        c = self.config
        shape = (first.channels, first.height, first.width)
        for name, fmap in (("second input", second), ("output", dst)):
            if (fmap.channels, fmap.height, fmap.width) != shape:
                raise ValueError(f"the {name} map is {fmap.channels}×{fmap.height}×"
                                 f"{fmap.width}, the first input {'×'.join(map(str, shape))}")
        self._check_maps(first, dst, first.channels, first.channels, (1, 1), 1, (0, 0, 0, 0))
        groups = c.cols // c.requant_lanes
        channels, height, width = shape
        if (c.rescale_tables or c.requant_from_map) and width > c.accumulator_depth:
            raise DoesNotFit(f"an add of {width}-pixel rows needs {width} accumulator "
                             f"words, accumulator_depth is {c.accumulator_depth}")
        if c.rescale_tables and by_tables:
            self._add_by_tables(first, second, dst, first_scale, second_scale, requant)
            return
        if c.requant_from_map:
            self._add_from_maps(first, second, dst, first_scale, second_scale, requant)
            return
        if 2 * width > c.accumulator_depth:
            raise DoesNotFit(f"an add of {width}-pixel rows needs {2 * width} accumulator "
                             f"words, accumulator_depth is {c.accumulator_depth}")
        # With the requantizer beside the array and room for three chunks, both inputs
        # pass through the array first (into [0, count) and [count, 2·count)), beside
        # the previous chunk's output REQUANT, and both rescales go into [2·count,
        # 3·count): the rescales, which stop the sequencer, no longer wait for a pass.
        both_first = c.requant_overlap and c.accumulator_depth >= 3 * width
        chunk_rows = min(height, c.accumulator_depth // ((3 if both_first else 2) * width))

        inputs = [(first, self._rescale_params(first_scale)),
                  (second, self._rescale_params(second_scale))]
        identity_at, sum_params = {}, {}
        ins = self.instructions
        ins.append(Instruction(Opcode.SETKERN, {"kernel_w": 1, "kernel_h": 1,
                                                "kernel_row_step": 0}))
        chunks = []   # (tile, lane, first row, words) in the order they run
        for tile in range(ceil_div(channels, c.rows)):
            for lane in range(0, c.rows, c.cols):
                if tile * c.rows + lane >= channels:
                    break
                if lane not in identity_at:
                    diagonal = np.zeros((c.rows, c.cols), dtype=np.int64)
                    for col in range(min(c.cols, c.rows - lane)):
                        diagonal[lane + col, col] = 1
                    identity_at[lane] = self._store_weights(diagonal)
                channels_here = tile * c.rows + lane + np.arange(c.cols)
                sum_params[tile, lane] = self._store_params(requant.lanes(
                    channels_here).reshape(groups, c.requant_lanes, 3))
                chunks += [(tile, lane, y0, rows * width)
                           for y0, rows in _balanced_chunks(height, chunk_rows)]

        for tile, lane, y0, count in chunks:
            if both_first:
                self._add_both_first(inputs, identity_at[lane], tile, y0, count, requant)
                self._add_sum_out(requant, dst, sum_params[tile, lane], 2 * count, count,
                                  tile, y0, lane)
                continue
            for which, (fmap, params_at) in enumerate(inputs):
                # The input through the array into accumulators [0, count), then
                # rescaled into [count, 2·count), the second added to the first. The
                # first GEMM may run beside the previous chunk's output REQUANT
                # (the compiler's overlap_requants sets its overlap bit where safe).
                ins.append(Instruction(Opcode.SETWIN, {
                    "row_length": width, "row_step": fmap.pitch, "col_step": 1}))
                ins.append(Instruction(Opcode.SETGEMM, {
                    "weight_addr": identity_at[lane], "k_tiles": 1, "tile_step": 0}))
                ins.append(Instruction(Opcode.GEMM, {
                    "bank": self.bank, "act_addr": fmap.word(tile, y0, 0),
                    "acc_addr": 0, "count": count}))
                self.bank ^= 1
                if which == 0:
                    self.flush_fills()   # the output's halo, beside the first GEMM
                    ins.append(Instruction(Opcode.SETPP, {
                        "zero_point": 0, "clamp_min": -(1 << 15),
                        "clamp_max": (1 << 15) - 1}))
                ins.append(Instruction(Opcode.SETREQ, {
                    "param_addr": params_at, "out_stride": 0}))
                ins.append(Instruction(Opcode.REQUANT, {
                    "acc_addr": 0, "count": count, "out_addr": count, "to_acc": 1,
                    "accumulate": which, "left_shift": 1,
                    "single_rounding": requant.single_rounding,
                    "ties_to_even": requant.ties_to_even}))
            self._add_sum_out(requant, dst, sum_params[tile, lane], count, count, tile, y0,
                              lane)

    def _add_both_first(self, inputs: list[tuple[FeatureMap, int]], identity_at: int,
                        tile: int, y0: int, count: int, requant: Requant) -> None:
        """An add's chunk of ``count`` words (:meth:`add`, ``both_first``): each input
        through the array into its own ``count`` accumulator words, then each rescaled
        into the next ``count`` after both, the second added to the first."""
        ins = self.instructions
        width = inputs[0][0].width
        for which, (fmap, _) in enumerate(inputs):
            ins.append(Instruction(Opcode.SETWIN, {
                "row_length": width, "row_step": fmap.pitch, "col_step": 1}))
            ins.append(Instruction(Opcode.SETGEMM, {
                "weight_addr": identity_at, "k_tiles": 1, "tile_step": 0}))
            ins.append(Instruction(Opcode.GEMM, {
                "bank": self.bank, "act_addr": fmap.word(tile, y0, 0),
                "acc_addr": which * count, "count": count}))
            self.bank ^= 1
        self.flush_fills()   # the output's halo, beside the passes
        ins.append(Instruction(Opcode.SETPP, {
            "zero_point": 0, "clamp_min": -(1 << 15), "clamp_max": (1 << 15) - 1}))
        for which, (_, params_at) in enumerate(inputs):
            ins.append(Instruction(Opcode.SETREQ, {"param_addr": params_at, "out_stride": 0}))
            ins.append(Instruction(Opcode.REQUANT, {
                "acc_addr": which * count, "count": count, "out_addr": 2 * count,
                "to_acc": 1, "accumulate": which, "left_shift": 1,
                "single_rounding": requant.single_rounding,
                "ties_to_even": requant.ties_to_even}))

    def _add_sum_out(self, requant: Requant, dst: FeatureMap, params_at: int, acc_addr: int,
                     count: int, tile: int, y0: int, lane: int = 0) -> None:
        """An add's last pass: the sums in ``count`` accumulator words from ``acc_addr``
        requantized into ``dst``'s rows from ``y0`` on, channel tile ``tile``."""
        self.instructions += [
            Instruction(Opcode.SETPP, {"zero_point": requant.zero_point,
                                       "clamp_min": requant.clamp_min,
                                       "clamp_max": requant.clamp_max}),
            Instruction(Opcode.SETOUT, {"row_length": dst.width, "row_step": dst.pitch}),
            Instruction(Opcode.SETREQ, {"param_addr": params_at,
                                        "out_stride": dst.tile_words}),
            Instruction(Opcode.REQUANT, {
                "acc_addr": acc_addr, "count": count, "out_addr": dst.word(tile, y0, 0),
                "out_lane": lane, "single_rounding": requant.single_rounding,
                "ties_to_even": requant.ties_to_even})]

    def _rescale_params(self, scale: Rescale) -> int:
        """Parameter words of an add input's rescale: −zero point, multiplier and shift
        in every lane."""
        c = self.config
        lanes = np.tile([-scale.zero_point, scale.multiplier, scale.shift],
                        (c.cols, 1)).astype(np.int64)
        return self._store_params(lanes.reshape(c.cols // c.requant_lanes,
                                                c.requant_lanes, 3))

    def _add_by_tables(self, first: FeatureMap, second: FeatureMap, dst: FeatureMap,
                       first_scale: Rescale, second_scale: Rescale, requant: Requant) -> None:
        """The add on an NPU with ``rescale_tables``: a TABLE of both inputs' rescaled
        values, then per chunk of rows each input looked up from its map into the same
        accumulators (RESCALE, a word a cycle; the second added), and the sum requantized
        into ``dst`` beside the next chunk's lookups (in the other part of the
        accumulators): one requantizer pass and none through the array.

        The TABLE goes beside a GEMM of the operators before (:meth:`_table_place`),
        and the first chunk's lookups into accumulator words the last REQUANT does not
        read, so that they may run beside it."""
        c = self.config
        groups = c.cols // c.requant_lanes
        channels, height, width = first.channels, first.height, first.width
        # Two parts of the accumulators, so that a chunk's lookups run beside the REQUANT
        # of the chunk before; one where two rows do not fit.
        parts = 2 if 2 * width <= c.accumulator_depth else 1
        # The last chunk's REQUANT (2·g·words) and each chunk's fixed steps (about a
        # dozen cycles) trade against each other: about sqrt(words / 6) chunks in all.
        tiles = ceil_div(channels, c.rows)
        chunks = max(1, round(math.sqrt(tiles * height * width / 6) / tiles))
        chunk_rows = min(ceil_div(height, chunks), c.accumulator_depth // (parts * width))
        ins = self.instructions
        tables = Instruction(Opcode.TABLE, {"param_addr": self._store_params(
            self._rescale_tables(first_scale, second_scale, requant))})
        at = self._table_place()
        ins.insert(at, tables)
        self.insertions.append(at)
        base = 0
        if ins[-1].opcode is Opcode.REQUANT:   # the first lookups beside it: other words
            busy = range(ins[-1]["acc_addr"], ins[-1]["acc_addr"] + ins[-1]["count"])
            span = parts * chunk_rows * width
            if busy.start < span and busy.stop + span <= c.accumulator_depth:
                base = busy.stop
        part = 0
        for tile in range(tiles):
            sum_params = self._store_params(requant.lanes(
                tile * c.rows + np.arange(c.cols)).reshape(groups, c.requant_lanes, 3))
            for y0, rows in _balanced_chunks(height, chunk_rows):
                count, acc_addr = rows * width, base + part * chunk_rows * width
                for table, fmap in enumerate((first, second)):
                    ins.append(Instruction(Opcode.SETWIN, {
                        "row_length": width, "row_step": fmap.pitch, "col_step": 1}))
                    ins.append(Instruction(Opcode.RESCALE, {
                        "table": table, "accumulate": table, "count": count,
                        "act_addr": fmap.word(tile, y0, 0), "acc_addr": acc_addr}))
                self.flush_fills()   # the output's halo, after the first lookups
                self._add_sum_out(requant, dst, sum_params, acc_addr, count, tile, y0)
                part = (part + 1) % parts

    def _table_place(self) -> int:
        """Where an add's TABLE goes: just before the first GEMM after the last REQUANT
        (not to_acc) that a GEMM follows, so that it runs beside that GEMM once the
        REQUANT is done (a TABLE dispatches beside a REQUANT with overlap, and waits for
        it) and no step that waits for the requantizer waits for it; at the end if there
        is none, or a RESCALE or TABLE after it."""
        ins = self.instructions
        gemm = None   # the first GEMM after the instruction looked at
        for at in range(len(ins) - 1, -1, -1):
            if ins[at].opcode in (Opcode.RESCALE, Opcode.TABLE):
                break
            if ins[at].opcode is Opcode.GEMM:
                gemm = at
            elif ins[at].opcode is Opcode.REQUANT and not ins[at]["to_acc"] and gemm:
                return gemm
        return len(ins)

    def _rescale_tables(self, first: Rescale, second: Rescale, requant: Requant) -> np.ndarray:
        """TABLE's parameter words: each input value's rescale (what a REQUANT to_acc with
        ``left_shift`` gives it) for the first input in the bias fields, for the second
        in the multiplier fields (``layouts.TABLE_FIELDS``)."""
        c = self.config
        entries = c.table_entries
        values = np.arange(entries, dtype=np.int64)
        values = np.where(values < entries // 2, values, values - entries)   # two's complement
        rounding = ("single" if requant.single_rounding else "double") + (
            "_even" if requant.ties_to_even else "")
        words = np.zeros((c.table_param_words * c.requant_lanes, 3), dtype=np.int64)
        for column, scale in enumerate((first, second)):
            words[:entries, column] = requantize_raw(
                values, -scale.zero_point, scale.multiplier, scale.shift, 0,
                accumulator_width=c.accumulator_width, rounding=rounding, left_shift=1)
        return words.reshape(c.table_param_words, c.requant_lanes, 3)

    def _add_from_maps(self, first: FeatureMap, second: FeatureMap, dst: FeatureMap,
                       first_scale: Rescale, second_scale: Rescale, requant: Requant) -> None:
        """The add on an NPU whose REQUANT to_acc reads maps (``requant_from_map``): per
        chunk of rows, each input rescaled from its map into the same accumulators (the
        second added), then the sum requantized into ``dst``; three requantizer passes
        and none through the array."""
        c = self.config
        groups = c.cols // c.requant_lanes
        channels, height, width = first.channels, first.height, first.width
        # Half the accumulators, so that the next layer's first GEMM may run beside the
        # last REQUANT (the compiler's overlap_requants).
        chunk_rows = min(height, max(1, c.accumulator_depth // (2 * width)))

        inputs = [(first, self._rescale_params(first_scale)),
                  (second, self._rescale_params(second_scale))]
        ins = self.instructions
        self.flush_fills()   # the output's halo
        for tile in range(ceil_div(channels, c.rows)):
            sum_params = self._store_params(requant.lanes(
                tile * c.rows + np.arange(c.cols)).reshape(groups, c.requant_lanes, 3))
            for y0 in range(0, height, chunk_rows):
                count = min(chunk_rows, height - y0) * width
                ins.append(Instruction(Opcode.SETPP, {
                    "zero_point": 0, "clamp_min": -(1 << 15), "clamp_max": (1 << 15) - 1}))
                for which, (fmap, params_at) in enumerate(inputs):
                    ins.append(Instruction(Opcode.SETOUT, {
                        "row_length": width, "row_step": fmap.pitch, "from_map": 1}))
                    ins.append(Instruction(Opcode.SETREQ, {
                        "param_addr": params_at, "out_stride": 0}))
                    ins.append(Instruction(Opcode.REQUANT, {
                        "acc_addr": fmap.word(tile, y0, 0), "count": count, "out_addr": 0,
                        "to_acc": 1, "accumulate": which, "left_shift": 1,
                        "single_rounding": requant.single_rounding,
                        "ties_to_even": requant.ties_to_even}))
                self._add_sum_out(requant, dst, sum_params, 0, count, tile, y0)

    def fill_halo(self, fmap: FeatureMap) -> None:
        """Write ``fmap``'s halo (its padding value) around the pixels of every channel
        tile. A map's words are shared with other maps at other times, so its halo is
        written while its layer makes it (the next operator takes the FILLs and runs them
        beside its GEMMs), on every run. A padding value past FILL's 8 bits takes
        REQUANTs whose multiplier is 0, which turn any accumulator into the zero point."""
        c = self.config
        if not any(fmap.halo):
            return
        value = _FILL_FIELDS["value"]
        if value.low <= fmap.fill <= value.high:
            self._fill_runs(fmap)
            return
        if self._zero_params is None:
            groups = c.cols // c.requant_lanes
            self._zero_params = self._store_params(
                np.zeros((groups, c.requant_lanes, 3), dtype=np.int64))
        top, left, bottom, right = fmap.halo
        pitch, height, width = fmap.pitch, fmap.height, fmap.width
        tiles = -(-fmap.channels // c.rows)
        # Three runs cover a tile's halo: the top rows and the first row's left; the right
        # of each row with the left of the next; the last row's right and the bottom rows.
        first_run = (0, top * pitch + left)
        last_run = ((top + height - 1) * pitch + left + width, right + bottom * pitch)
        ins = self.instructions
        ins.append(Instruction(Opcode.SETPP, {"zero_point": fmap.fill, "clamp_min": -128,
                                              "clamp_max": 127}))
        ins.append(Instruction(Opcode.SETREQ, {"param_addr": self._zero_params,
                                               "out_stride": fmap.tile_words}))

        def requant(out_addr: int, count: int, lane: int) -> None:
            for start in range(0, count, c.accumulator_depth):
                ins.append(Instruction(Opcode.REQUANT, {
                    "acc_addr": 0, "count": min(c.accumulator_depth, count - start),
                    "out_addr": out_addr + start, "out_lane": lane,
                    # Either rounding of a zero product gives the zero point.
                    "single_rounding": int(c.rounding == "single")}))

        # A REQUANT writes `cols` lanes from `lane`, those past `rows` in the next tile. In
        # the last tile only the groups that hold channels are written: a group past them
        # would spill beyond the map (FeatureMap.tiles leaves room for the groups with
        # channels only), into words another map holds at the time.
        def tiles_of(lane: int) -> int:
            return tiles if (tiles - 1) * c.rows + lane < fmap.channels else tiles - 1

        for offset, length in (first_run, last_run):
            if length == 0:
                continue
            # The same run in every tile: runs of `length` words, a tile apart.
            ins.append(Instruction(Opcode.SETOUT, {"row_length": length,
                                                   "row_step": fmap.tile_words}))
            for lane in range(0, c.rows, c.cols):
                if tiles_of(lane):
                    requant(fmap.base + offset, length * tiles_of(lane), lane)
        if height > 1 and left + right:
            ins.append(Instruction(Opcode.SETOUT, {"row_length": left + right,
                                                   "row_step": pitch}))
            for tile in range(tiles):
                for lane in range(0, c.rows, c.cols):
                    if tile < tiles_of(lane):
                        requant(fmap.word(tile, 0, width), (height - 1) * (left + right),
                                lane)

    def _fill_runs(self, fmap: FeatureMap) -> None:
        """FILLs of ``fmap``'s halo, kept for the next operator (:meth:`_take_fills`):
        the top rows and first row's left of every tile, the last row's right and bottom
        rows of every tile, and the right and left of each row boundary, all tiles at
        once (their rows follow each other)."""
        top, left, bottom, right = fmap.halo
        pitch, height, width = fmap.pitch, fmap.height, fmap.width
        tiles = -(-fmap.channels // self.config.rows)
        first = top * pitch + left
        last = right + bottom * pitch
        runs = [(fmap.base, first * tiles, first, fmap.tile_words),
                (fmap.word(0, height - 1, width), last * tiles, last, fmap.tile_words)]
        if left + right:
            rows = (tiles - 1) * fmap.padded_height + height - 1
            runs.append((fmap.word(0, 0, width), rows * (left + right), left + right, pitch))
        for out_addr, count, length, step in runs:
            if count == 0:
                continue
            if length <= _FILL_FIELDS["row_length"].high and step <= _FILL_FIELDS[
                    "row_step"].high:
                self._pending_fills.append(_fill(fmap.fill, out_addr, count, length, step))
                continue
            for start in range(0, count, length):   # a FILL per run
                self._pending_fills.append(_fill(fmap.fill, out_addr + start // length * step,
                                                 min(length, count - start), 0, 0))

    def fill_halo_now(self, fmap: FeatureMap) -> None:
        """Write ``fmap``'s halo here, after the operator that made it in place over its
        input (:mod:`npugen.inplace`): the FILLs wait for its last REQUANT, so for its
        last read of the input, and a SETPP after them waits for the FILLs, so the next
        operator reads the halo written."""
        start = len(self.instructions)
        self.fill_halo(fmap)
        self.flush_fills()
        if any(ins.opcode is Opcode.FILL for ins in self.instructions[start:]):
            self.instructions.append(Instruction(Opcode.SETPP, {
                "zero_point": fmap.fill, "clamp_min": -128, "clamp_max": 127}))

    def _take_fills(self) -> list[Instruction]:
        """The FILLs :meth:`fill_halo` keeps for the next operator."""
        fills, self._pending_fills = self._pending_fills, []
        return fills

    def instructions_at_end(self) -> int:
        """The instructions emitted so far and the FILLs :meth:`flush_fills` would add."""
        return len(self.instructions) + len(self._pending_fills)

    def flush_fills(self) -> None:
        """Emit the FILLs no operator has taken yet."""
        self.instructions += self._take_fills()

    # -- the common schedule -------------------------------------------------------------

    def _plain_gemm(self, src: FeatureMap, dst: FeatureMap, kernel: tuple[int, int],
                    stride: int | tuple[int, int], pads: tuple[int, int, int, int],
                    out_tiles: int) -> bool:
        """Whether a convolution is a plain GEMM: 1×1, stride 1, its pixels contiguous in
        both maps (no halos), every output tile in the accumulators at once, and the walk
        registers still as a start sets them (no SETKERN, SETWIN or SETOUT so far)."""
        pixels = src.height * src.width
        if self.config.requant_overlap and self.config.feature_maps:
            return False   # _emit_overlapped keeps the requantizer beside the array
        return (kernel == (1, 1) and stride_pair(stride) == (1, 1) and not any(pads)
                and not any(src.halo) and not any(dst.halo)
                and out_tiles * pixels <= self.config.accumulator_depth
                and not any(ins.opcode in _WALK_OPCODES for ins in self.instructions))

    def _emit_gemm(self, src: FeatureMap, dst: FeatureMap, tiles: list[_OutTile],
                   requant: Requant) -> None:
        """A plain GEMM (:meth:`_plain_gemm`) as :mod:`npugen.schedule` schedules it: the
        pixels are the rows of A, each output tile's weights follow the previous tile's,
        so one SETGEMM serves every GEMM, and the banks alternate across the K tiles of
        every output tile. Then SETPP (under the last stream) and a REQUANT per tile."""
        c = self.config
        groups = c.cols // c.requant_lanes
        weight_at = [self._store_weights(tile.weights) for tile in tiles]
        param_at = [self._store_params(requant.lanes(tile.channels).reshape(
            groups, c.requant_lanes, 3)) for tile in tiles]
        plan = GemmPlan(c, src.height * src.width, src.channels, dst.channels,
                        act_base=src.base, weight_base=weight_at[0])
        self.flush_fills()
        ins = self.instructions
        ins += gemm_instructions(plan, first_bank=self.bank)
        self.bank = next_bank(plan, self.bank)
        ins.append(Instruction(Opcode.SETPP, {
            "zero_point": requant.zero_point, "clamp_min": requant.clamp_min,
            "clamp_max": requant.clamp_max}))
        for index, tile in enumerate(tiles):
            ins.append(Instruction(Opcode.SETREQ, {
                "param_addr": param_at[index], "out_stride": dst.tile_words}))
            ins.append(Instruction(Opcode.REQUANT, {
                "acc_addr": plan.acc_addr(index), "count": plan.m,
                "out_addr": dst.word(tile.dst_channel // c.rows, 0, 0),
                "out_lane": tile.dst_channel % c.rows,
                "single_rounding": requant.single_rounding,
                    "ties_to_even": requant.ties_to_even}))

    def _check_maps(self, src: FeatureMap, dst: FeatureMap, c_in: int, c_out: int,
                    kernel: tuple[int, int], stride: int | tuple[int, int],
                    pads: tuple[int, int, int, int]) -> None:
        c = self.config
        for name, fmap in (("input", src), ("output", dst)):
            if (fmap.rows, fmap.cols) != (c.rows, c.cols):
                raise ValueError(f"the {name} map is laid out for {fmap.rows}×{fmap.cols}, "
                                 f"the NPU is {c.rows}×{c.cols}")
        if src.channels != c_in:
            raise ValueError(f"the input map has {src.channels} channels, the weights "
                             f"take {c_in}")
        kh, kw = kernel
        if not 1 <= kh <= 255 or not 1 <= kw <= 255:
            raise DoesNotFit(f"kernel {kh}×{kw}: the NPU walks kernels up to 255×255")
        step_y, step_x = stride_pair(stride)
        if not (1 <= step_y <= 255 and 1 <= step_x <= 255):
            raise DoesNotFit(f"stride {stride}: the NPU steps 1 to 255 words")
        top, left, bottom, right = pads
        if any(p < 0 for p in pads):
            raise ValueError(f"pads must not be negative, not {pads}")
        halo = src.halo
        if not src.holds_pads(pads):
            raise ValueError(f"pads {pads} (top, left, bottom, right) exceed the input "
                             f"map's halo {halo}")
        out_h = conv_output_size(src.height, kh, step_y, top, bottom)
        out_w = conv_output_size(src.width, kw, step_x, left, right)
        if out_h < 1 or out_w < 1:
            raise ValueError(f"a {kh}×{kw} kernel does not fit a padded "
                             f"{src.height}×{src.width} map")
        if (dst.channels, dst.height, dst.width) != (c_out, out_h, out_w):
            raise ValueError(f"the output map is {dst.channels}×{dst.height}×{dst.width}, "
                             f"the operator makes {c_out}×{out_h}×{out_w}")

    def _emit(self, src: FeatureMap, dst: FeatureMap, tiles: list[_OutTile],
              requant: Requant, kernel: tuple[int, int], stride: int | tuple[int, int],
              pads: tuple[int, int, int, int], *, k_tiles: int, combine_max: bool = False,
              reduce: bool = False, depthwise: bool = False, phased: bool = False,
              pixel_requants: tuple[np.ndarray, dict[int, Requant]] | None = None,
              one_requant: bool | None = None) -> None:
        """Every output tile, chunk by chunk of output rows. ``depthwise``: the tiles are
        the depthwise mode's (:meth:`_depthwise_mode_tiles`), each chunk one stream over
        the input's rows, the results of windows that wrap into the next row dropped.
        ``one_requant``: a one-pixel layer's tiles requantized by one REQUANT
        (:meth:`_emit_one_pixel`) or a REQUANT each; None: the faster in the cycle model."""
        c = self.config
        if (one_requant is None and pixel_requants is None and not (reduce or depthwise)
                and self._one_requant(dst, tiles)):
            self._cheaper(*(lambda trial, one=one: trial._emit(
                src, dst, tiles, requant, kernel, stride, pads, k_tiles=k_tiles,
                combine_max=combine_max, phased=phased, one_requant=one)
                for one in (True, False)))
            return
        kh, kw = kernel
        step_y, step_x = stride_pair(stride)
        top, left = pads[0], pads[1]
        out_h, out_w = dst.height, dst.width
        groups = c.cols // c.requant_lanes
        # Weights and parameters of every output tile, stored once.
        weight_at, param_at = [], []
        for tile in tiles:
            weight_at.append(self._store_weights(tile.weights))
            param_at.append(self._store_params(
                requant.lanes(tile.channels).reshape(groups, c.requant_lanes, 3)))
        # Per-pixel requantization: parameters of every key for every output tile.
        keys, key_params = None, {}
        if pixel_requants is not None:
            keys, by_key = pixel_requants
            for key, each in by_key.items():
                key_params[key] = [self._store_params(each.lanes(tile.channels).reshape(
                    groups, c.requant_lanes, 3)) for tile in tiles]
        # Pixels per accumulator word run, and how many output tiles share the memory.
        words_per_row = 1 if reduce else out_w
        capacity = c.accumulator_depth
        if words_per_row > capacity:
            raise DoesNotFit(f"an output row of {out_w} pixels needs more than the "
                             f"{capacity} accumulator words (accumulator_depth)")
        per_block = min(len(tiles), capacity // words_per_row)
        chunk_rows = 1 if reduce else max(1, min(out_h, capacity // (per_block * out_w)))
        ins = self.instructions
        # SETPP and SETOUT change the requantizer's registers, so they wait for the last
        # layer's REQUANT; with requant_overlap they follow this layer's first GEMM.
        requant_settings = [
            Instruction(Opcode.SETPP, {"zero_point": requant.zero_point,
                                       "clamp_min": requant.clamp_min,
                                       "clamp_max": requant.clamp_max}),
            Instruction(Opcode.SETOUT, {"row_length": out_w, "row_step": dst.pitch})]
        overlapped = c.requant_overlap and keys is None and words_per_row <= capacity // 2
        if not overlapped:
            ins.append(requant_settings[0])
        # The depthwise mode streams rows of `pitch` words: the map's, or by phases (stride
        # 2) every other word of every other row, a row of the output width + 2 words
        # (_phase_tiles).
        pitch = out_w + 2 if phased else src.pitch
        groups_g = c.depthwise_groups

        def origin(src_tile: int, y0: int) -> int:
            """Activation word of the first K tile's stream of the chunk from output row
            y0: phase (1, 1)'s, G − 1 phase rows above the first output's and two phase
            columns left of it (the window's lead; those words meet zero weights)."""
            if not phased:
                return src.word(src_tile, y0 * step_y - top, -left)
            addr = src.word(src_tile, 2 * y0 + 3 - 2 * groups_g - top, -3 - left)
            if addr < 0:
                raise DoesNotFit(f"the phase mode's stream would start at activation word "
                                 f"{addr}")
            return addr

        if depthwise and phased:   # K tile k: phase (1 − k div 2, 1 − k mod 2)
            ins.append(Instruction(Opcode.SETKERN, {
                "kernel_w": 2, "kernel_h": 2, "kernel_row_step": src.pitch}))
        elif depthwise:   # a pass per K tile, its window a kernel row lower
            ins.append(Instruction(Opcode.SETKERN, {
                "kernel_w": 1, "kernel_h": k_tiles, "kernel_row_step": src.pitch}))
        else:
            ins.append(Instruction(Opcode.SETKERN, {
                "kernel_w": 1 if reduce else kw, "kernel_h": 1 if reduce else kh,
                "kernel_row_step": src.pitch}))
        if depthwise and phased:
            ins.append(Instruction(Opcode.SETWIN, {
                "row_length": pitch, "row_step": 2 * src.pitch, "col_step": 2,
                "depthwise": 1, "pitch": pitch, "drop": pitch - out_w}))
        elif depthwise:
            ins.append(Instruction(Opcode.SETWIN, {
                "row_length": 0, "row_step": 0, "col_step": 1, "depthwise": 1,
                "pitch": src.pitch, "drop": src.pitch - out_w}))
        elif reduce:
            ins.append(Instruction(Opcode.SETWIN, {
                "row_length": src.width, "row_step": src.pitch, "col_step": 1, "reduce": 1}))
        else:
            ins.append(Instruction(Opcode.SETWIN, {
                "row_length": out_w, "row_step": step_y * src.pitch, "col_step": step_x}))
        lead = depthwise_lead(c, pitch) if depthwise else 0
        # Every depthwise-mode MATMUL reads the tap row: its tiles carry its weight (the
        # GEMMs below, and only they, read the flag).
        self._tap_row = depthwise and c.depthwise_tap_row
        # (_one_requant held; the parameters follow each other but past a full memory.)
        if one_requant and param_at == [param_at[0] + i * groups for i in range(len(tiles))]:
            self._emit_one_pixel(src, dst, tiles, requant, weight_at, param_at,
                                 k_tiles=k_tiles, combine_max=combine_max,
                                 settings=requant_settings[:1] if overlapped else [],
                                 origin=origin)
            return
        if overlapped:
            # A convolution's K tiles walk the taps of each input-channel tile in turn.
            taps = 1 if reduce else kh * kw
            split = k_tiles - taps if not depthwise and k_tiles > taps else 0
            self._emit_overlapped(src, dst, tiles, requant, weight_at, param_at,
                                  k_tiles=k_tiles, combine_max=combine_max, reduce=reduce,
                                  lead=lead, settings=requant_settings, split=split,
                                  origin=origin, pitch=pitch)
            return
        ins.append(requant_settings[1])
        self.flush_fills()   # beside the first GEMM
        for y0 in range(0, out_h, chunk_rows):
            rows_here = min(chunk_rows, out_h - y0)
            count, acc_words = _chunk_words(src, dst, rows_here, reduce, depthwise, lead,
                                            pitch)
            for first in range(0, len(tiles), per_block):
                block = range(first, min(first + per_block, len(tiles)))
                for slot, index in enumerate(block):
                    self._tile_gemm(src, weight_at[index], k_tiles, combine_max,
                                    origin(tiles[index].src_tile, y0), slot * acc_words, count)
                for slot, index in enumerate(block):
                    tile = tiles[index]
                    out_tile, lane = tile.dst_channel // c.rows, tile.dst_channel % c.rows
                    if keys is not None:
                        # One REQUANT per run of pixels of one key along each row.
                        for y in range(y0, y0 + rows_here):
                            runs = np.flatnonzero(np.diff(keys[y]) != 0) + 1
                            for x0, x1 in zip([0, *runs], [*runs, out_w], strict=True):
                                ins.append(Instruction(Opcode.SETREQ, {
                                    "param_addr": key_params[int(keys[y, x0])][index],
                                    "out_stride": dst.tile_words}))
                                ins.append(Instruction(Opcode.REQUANT, {
                                    "acc_addr": slot * acc_words + (y - y0) * out_w + x0,
                                    "count": int(x1 - x0),
                                    "out_addr": dst.word(out_tile, y, int(x0)),
                                    "out_lane": lane,
                                    "single_rounding": requant.single_rounding,
                    "ties_to_even": requant.ties_to_even}))
                        continue
                    ins.append(Instruction(Opcode.SETREQ, {
                        "param_addr": param_at[index], "out_stride": dst.tile_words}))
                    ins.append(Instruction(Opcode.REQUANT, {
                        "acc_addr": slot * acc_words, "count": acc_words,
                        "out_addr": dst.word(out_tile, y0, 0), "out_lane": lane,
                        "single_rounding": requant.single_rounding,
                        "ties_to_even": requant.ties_to_even}))

    def _one_requant(self, dst: FeatureMap, tiles: list[_OutTile]) -> bool:
        """Whether a layer's output tiles can be requantized by one REQUANT with SETREQ's
        ``param_walk`` (their parameters stored one after the other, as :meth:`_emit`
        does): one pixel (a dense layer at batch 1), two or more tiles whose results fill
        consecutive output tiles from lane 0 (a square array), all in the accumulators at
        once."""
        c = self.config
        out_tiles = [tile.dst_channel // c.rows for tile in tiles]
        return (dst.height * dst.width == 1 and len(tiles) > 1 and c.rows == c.cols
                and len(tiles) <= c.accumulator_depth // 3
                and all(tile.dst_channel % c.rows == 0 for tile in tiles)
                and out_tiles == list(range(out_tiles[0], out_tiles[0] + len(tiles))))

    def _emit_one_pixel(self, src: FeatureMap, dst: FeatureMap, tiles: list[_OutTile],
                        requant: Requant, weight_at: list[int], param_at: list[int], *,
                        k_tiles: int, combine_max: bool, settings: list[Instruction],
                        origin) -> None:
        """The GEMMs of a one-pixel layer's output tiles into consecutive accumulator
        words, then one REQUANT for them all (SETREQ ``param_walk``: word t takes tile t's
        parameters), where a REQUANT a tile took a SETREQ, a REQUANT's tail and their
        waits apiece. ``settings``: the layer's SETPP when it waits for the last layer's
        REQUANT (requant_overlap), emitted after the first GEMM."""
        c = self.config
        ins = self.instructions
        start = self._acc_regions(len(tiles), 1)[0]
        for index, tile in enumerate(tiles):
            self._tile_gemm(src, weight_at[index], k_tiles, combine_max,
                            origin(tile.src_tile, 0), start + index, 1)
            if index == 0:
                ins.extend(settings)
                # Word t's results to output tile t.
                ins.append(Instruction(Opcode.SETOUT, {"row_length": 1,
                                                       "row_step": dst.tile_words}))
                self.flush_fills()   # beside the GEMMs
        ins.append(Instruction(Opcode.SETREQ, {"param_addr": param_at[0],
                                               "out_stride": dst.tile_words,
                                               "param_walk": 1}))
        ins.append(Instruction(Opcode.REQUANT, {
            "acc_addr": start, "count": len(tiles),
            "out_addr": dst.word(tiles[0].dst_channel // c.rows, 0, 0), "out_lane": 0,
            "single_rounding": requant.single_rounding,
            "ties_to_even": requant.ties_to_even}))

    def _emit_overlapped(self, src: FeatureMap, dst: FeatureMap, tiles: list[_OutTile],
                         requant: Requant, weight_at: list[int], param_at: list[int], *,
                         k_tiles: int,
                         combine_max: bool, reduce: bool, lead: int,
                         settings: list[Instruction], split: int,
                         origin, pitch: int) -> None:
        """The steps of :meth:`_emit` for an NPU with ``requant_overlap``: one output tile
        and chunk of rows at a time, in turn in parts of the accumulators, each tile's
        REQUANT running (``overlap``) beside the next one's GEMM (:meth:`_acc_regions`).

        The layer's requantizer ``settings`` (SETPP, SETOUT) wait for the last layer's
        REQUANT, so they come after the first GEMM's first ``split`` K tiles (all of them
        if 0), which then may stream beside it: its last input-channel tile is the one
        the last layer writes last (``overlap_requants`` sets the bit where they may).
        ``origin(src_tile, y0)``: the first K tile's activation word for the chunk from
        output row y0; ``pitch``: the depthwise mode's stream pitch."""
        c = self.config
        half = c.accumulator_depth // 2
        chunk_rows = 1 if reduce else min(dst.height, half // dst.width)
        items = [(y0, index) for y0 in range(0, dst.height, chunk_rows)
                 for index in range(len(tiles))]
        ins = self.instructions

        def counts(y0: int) -> tuple[int, int]:
            """Activation words streamed and accumulator words written by a chunk."""
            return _chunk_words(src, dst, min(chunk_rows, dst.height - y0), reduce,
                                bool(lead), lead, pitch)

        regions = self._acc_regions(max(counts(y0)[1] for y0, _ in items), len(items))

        def gemm(k: int) -> None:
            y0, index = items[k]
            act_addr = origin(tiles[index].src_tile, y0)
            if k > 0 or not split:
                self._tile_gemm(src, weight_at[index], k_tiles, combine_max, act_addr,
                                regions[k], counts(y0)[0])
                ins.extend(settings if k == 0 else [])
                return
            self._tile_gemm(src, weight_at[index], split, combine_max, act_addr, regions[0],
                            counts(y0)[0])
            ins.extend(settings)
            self._tile_gemm(src, weight_at[index] + split * c.rows, k_tiles - split,
                            combine_max, act_addr + split // taps * src.tile_words, regions[0],
                            counts(y0)[0], accumulate=True)

        taps = k_tiles - split if split else 1
        # The halo FILLs of the output map, spread over the tiles: each runs beside the
        # end of a GEMM, before its REQUANT.
        fills = _spread_fills(self._take_fills(), len(items))
        gemm(0)
        for k, (y0, index) in enumerate(items):
            ins += fills[k::len(items)]
            ins.append(Instruction(Opcode.SETREQ, {
                "param_addr": param_at[index], "out_stride": dst.tile_words}))
            tile = tiles[index]
            ins.append(Instruction(Opcode.REQUANT, {
                "acc_addr": regions[k], "count": counts(y0)[1],
                "out_addr": dst.word(tile.dst_channel // c.rows, y0, 0),
                "out_lane": tile.dst_channel % c.rows,
                "single_rounding": requant.single_rounding,
                "ties_to_even": requant.ties_to_even, "overlap": int(k + 1 < len(items))}))
            if k + 1 < len(items):
                gemm(k + 1)

    def _acc_regions(self, words: int, items: int) -> list[int]:
        """The accumulator word each of ``items`` chunks of up to ``words`` words starts
        at, in :meth:`_emit_overlapped`: in turn around the accumulators from past the
        words the last REQUANT reads where three chunks fit (so that the next layer's
        first GEMMs, and :func:`npugen.interleave.interleave`'s hoisted ones, find words
        no REQUANT still reads), else the two halves, the first the one that REQUANT
        does not read."""
        depth = self.config.accumulator_depth
        last = next((ins for ins in reversed(self.instructions)
                     if ins.opcode is Opcode.REQUANT), None)
        busy = (range(0) if last is None else range(depth) if last["to_acc"] else
                range(last["acc_addr"], last["acc_addr"] + last["count"]))
        if 3 * words > depth:
            first = int(len(busy) > 0 and busy.start < words)   # the lower half in use
            return [((first + k) % 2) * (depth // 2) for k in range(items)]
        starts, at = [], busy.stop if busy.stop + words <= depth else 0
        for _ in range(items):
            if at + words > depth:
                at = 0
            starts.append(at)
            at += words
        return starts

    def _tile_gemm(self, src: FeatureMap, weight_addr: int, k_tiles: int, combine_max: bool,
                   act_addr: int, acc_addr: int, count: int, *,
                   accumulate: bool = False) -> None:
        """SETGEMM and GEMM of one output tile's K tiles, from the next weight bank;
        ``accumulate``: added to the accumulator words (the rest of a split GEMM)."""
        self.instructions.append(Instruction(Opcode.SETGEMM, {
            "weight_addr": weight_addr, "k_tiles": k_tiles, "tile_step": src.tile_words,
            "tap_row": int(self._tap_row)}))
        self.instructions.append(Instruction(Opcode.GEMM, {
            "bank": self.bank, "accumulate": int(accumulate), "combine": int(combine_max),
            "act_addr": act_addr, "acc_addr": acc_addr, "count": count}))
        self.bank ^= k_tiles & 1

    def _store_weights(self, words: np.ndarray) -> int:
        at = self.weight_end
        self.weight_words.append(words)
        self.weight_end += len(words)
        if self.check_depths and self.weight_end > self.config.weight_depth:
            raise DoesNotFit(f"weights need {self.weight_end} words, weight_depth is "
                             f"{self.config.weight_depth}")
        # Past a full memory (check_depths False: the program is refused, its words only
        # counted) an address wraps as the instructions' 16-bit address fields do.
        return at & 0xFFFF

    def _store_params(self, words: np.ndarray) -> int:
        at = self.param_end
        self.param_words.append(words)
        self.param_end += len(words)
        if self.check_depths and self.param_end > self.config.param_depth:
            raise DoesNotFit(f"parameters need {self.param_end} words, param_depth is "
                             f"{self.config.param_depth}")
        # Past a full memory (check_depths False: the program is refused, its words only
        # counted) an address wraps as the instructions' 16-bit address fields do.
        return at & 0xFFFF

    def weights(self) -> np.ndarray:
        return np.concatenate(self.weight_words) if self.weight_words else np.zeros(
            (0, self.config.cols), dtype=np.int64)

    def params(self) -> np.ndarray:
        return np.concatenate(self.param_words) if self.param_words else np.zeros(
            (0, self.config.requant_lanes, 3), dtype=np.int64)
