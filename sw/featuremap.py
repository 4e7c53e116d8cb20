"""How a feature map lives in the activation memory (documented in docs/LAYOUT.md).

A C×H×W int8 map is cut into channel tiles of ``rows`` channels (one activation word
holds one pixel of one tile, channel ``c`` in lane ``c mod rows``). Each tile is a block of
``(top + H + bottom) × (left + W + right)`` words, row-major, so a tap of a convolution
is a fixed offset and a whole output row is a strided walk. Past a row's right edge the
walk reads the next row's left halo, so a map padded on both sides can keep a left halo
only and one more bottom row (:meth:`FeatureMap.holds_pads`): a word less a row. The
halo around the pixels holds the value that padding stands for (the zero point for a
convolution, the lowest int8 for max pooling); the NPU writes it before the layer that
makes the map
(:meth:`~npugen.lowering.Lowering.fill_halo`), and layers only write inside a map.

A layer's output is written ``cols`` channels at a time, so a map keeps room for the
last output tile's spill: it lands in spare lanes, never in another map. A map that only
a convolution or dense layer writes needs room for whole output tiles only, and one that
only the host writes (a batch of vectors, the input of an MLP) none (``spill``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FeatureMap", "im2col", "conv_output_size", "same_pads", "stride_pair", "SPILLS"]

#: What may write a map past its last channel, and so the spare lanes it keeps
#: (:attr:`FeatureMap.spill`).
SPILLS = ("any", "tiles", "none")


def stride_pair(stride: int | tuple[int, int]) -> tuple[int, int]:
    """A window's (vertical, horizontal) stride from one stride or a pair."""
    if isinstance(stride, tuple | list):
        return int(stride[0]), int(stride[1])
    return int(stride), int(stride)


def conv_output_size(size: int, kernel: int, stride: int, pad_before: int,
                     pad_after: int) -> int:
    """Output pixels along one axis of a window of ``kernel`` stepping by ``stride``."""
    return (size + pad_before + pad_after - kernel) // stride + 1


def same_pads(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], *,
              odd_after: bool = True) -> tuple[int, int, int, int]:
    """The padding that gives ceil(size / stride) outputs along each axis ("SAME"): (top,
    left, bottom, right), an odd pixel after (TFLite's SAME, ONNX's SAME_UPPER) or before
    (``odd_after`` false: ONNX's SAME_LOWER). Both front ends pad with it."""
    before, after = [], []
    for n, k, s in zip(size, kernel, stride, strict=True):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        first = total // 2 if odd_after else total - total // 2
        before.append(first)
        after.append(total - first)
    return before[0], before[1], after[0], after[1]


def im2col(values: np.ndarray, kernel: tuple[int, int], stride: int,
           pads: tuple[int, int, int, int], fill: int) -> np.ndarray:
    """A (C, H, W) map as (kh·kw·C, OH, OW): channel (dy·kw + dx)·C + c of output pixel
    (y, x) is input (c, y·stride + dy − top, x·stride + dx − left), ``fill`` outside.

    The host prepares a CNN's input this way when its first convolution has few input
    channels: the convolution then runs as a 1×1 convolution whose K tiles hold every
    tap, instead of one K tile per tap with most lanes empty."""
    kh, kw = kernel
    top, left, bottom, right = pads
    values = np.asarray(values)
    padded = np.pad(values, ((0, 0), (top, bottom), (left, right)), constant_values=fill)
    out_h = conv_output_size(values.shape[1], kh, stride, top, bottom)
    out_w = conv_output_size(values.shape[2], kw, stride, left, right)
    taps = [padded[:, dy:dy + stride * (out_h - 1) + 1:stride,
                   dx:dx + stride * (out_w - 1) + 1:stride]
            for dy in range(kh) for dx in range(kw)]
    return np.concatenate(taps, axis=0)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class FeatureMap:
    """A map of ``channels`` × ``height`` × ``width`` at activation word ``base``."""

    base: int
    channels: int
    height: int
    width: int
    rows: int
    cols: int
    halo: tuple[int, int, int, int] = (0, 0, 0, 0)   # top, left, bottom, right
    fill: int = 0
    # "any" operator's output tiles, "tiles": whole output tiles only (a convolution's or
    # dense layer's), "none": nothing past the channels (only the host writes it).
    spill: str = "any"

    def __post_init__(self) -> None:
        if self.spill not in SPILLS:
            raise ValueError(f"spill must be one of {', '.join(map(repr, SPILLS))}, "
                             f"not {self.spill!r}")

    @property
    def pitch(self) -> int:
        """Words from one row of the map to the next."""
        return self.halo[1] + self.width + self.halo[3]

    def holds_pads(self, pads: tuple[int, int, int, int]) -> bool:
        """Whether a walk padded by ``pads`` (top, left, bottom, right) finds the fill in
        the map's halo wherever it reads padding. Past a row's right halo it reads the
        next row's left halo, so the right padding may reach that far where the row below
        the lowest one read is in the map."""
        top, left, bottom, right = pads
        halo = self.halo
        if top > halo[0] or left > halo[1] or bottom > halo[2]:
            return False
        return right <= halo[3] or (right <= halo[3] + halo[1] and bottom < halo[2])

    @property
    def padded_height(self) -> int:
        return self.halo[0] + self.height + self.halo[2]

    @property
    def tile_words(self) -> int:
        return self.padded_height * self.pitch

    @property
    def tiles(self) -> int:
        """Channel tiles allocated: room for every lane an output writes, ``cols`` at a
        time, either as whole output tiles (a convolution's channels ``n·cols ...``) or
        per input tile (a per-channel operator's channels ``t·rows + j·cols ...``), as
        :attr:`spill` says."""
        if self.spill == "none":
            return _ceil_div(self.channels, self.rows)
        whole = _ceil_div(self.channels, self.cols) * self.cols
        if self.spill == "tiles":
            return _ceil_div(whole, self.rows)
        last_tile = (self.channels - 1) // self.rows
        last_group = (self.channels - 1 - last_tile * self.rows) // self.cols * self.cols
        per_tile = last_tile * self.rows + last_group + self.cols
        return _ceil_div(max(whole, per_tile), self.rows)

    @property
    def words(self) -> int:
        return self.tiles * self.tile_words

    @property
    def data_words(self) -> int:
        """Words of the tiles that hold channels (the spare tiles left out)."""
        return _ceil_div(self.channels, self.rows) * self.tile_words

    @property
    def end(self) -> int:
        return self.base + self.words

    def word(self, tile: int, y: int, x: int) -> int:
        """Activation word of pixel (y, x) of channel tile ``tile``; the halo is at
        negative coordinates and past the map's size."""
        return self.base + tile * self.tile_words + (y + self.halo[0]) * self.pitch + (
            x + self.halo[1])

    def pack(self, values: np.ndarray) -> np.ndarray:
        """A (C, H, W) int array as the map's words (halo filled), shape (words, rows)."""
        values = np.asarray(values)
        if values.shape != (self.channels, self.height, self.width):
            raise ValueError(f"a {self.channels}×{self.height}×{self.width} map cannot hold "
                             f"an array of shape {values.shape}")
        top, left = self.halo[0], self.halo[1]
        image = np.full((self.tiles * self.rows, self.padded_height, self.pitch), self.fill,
                        dtype=np.int64)
        image[:self.channels, top:top + self.height, left:left + self.width] = values
        tiles = image.reshape(self.tiles, self.rows, self.padded_height, self.pitch)
        return tiles.transpose(0, 2, 3, 1).reshape(-1, self.rows)

    def unpack(self, words: np.ndarray) -> np.ndarray:
        """The map's words (from ``base`` on, at least :attr:`data_words`) back to a
        (C, H, W) array."""
        words = np.asarray(words)[:self.words]
        if len(words) < self.words:
            words = np.concatenate([words, np.zeros((self.words - len(words), self.rows),
                                                    dtype=words.dtype)])
        tiles = words.reshape(self.tiles, self.padded_height, self.pitch, self.rows)
        image = tiles.transpose(0, 3, 1, 2).reshape(-1, self.padded_height, self.pitch)
        top, left = self.halo[0], self.halo[1]
        return image[:self.channels, top:top + self.height, left:left + self.width]
