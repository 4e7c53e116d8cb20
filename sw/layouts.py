"""The bit layout of a parameter-memory lane (one requantizer channel's bias, multiplier
and shift), shared by the gateware, the golden model, the host code and the docs.

No Amaranth here: the host packs and unpacks words by these tables, the gateware slices
them by the same tables.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SHIFT_BITS", "PARAM_LANE_FIELDS", "TABLE_FIELDS", "LaneField", "param_lane_fields",
           "param_lane_description"]

#: Bits of a parameter lane's shift field that the requantizer reads: right shifts 0 to 31.
SHIFT_BITS = 5

#: One requantizer channel's parameters, lowest bits first: (name, width in bits, signed,
#: bits read). Width None is the accumulator width; bits read None is the whole field,
#: else the field's low bits (an unsigned field only). The names are the requantizer's
#: ports (hw/requant.py).
PARAM_LANE_FIELDS: tuple[tuple[str, int | None, bool, int | None], ...] = (
    ("bias", None, True, None),
    ("multiplier", 32, True, None),
    ("shift", 8, False, SHIFT_BITS),
)

#: TABLE's parameter words (NPUs generated with ``rescale_tables``): lane j of word k holds
#: entry k·requant_lanes + j of table t in field TABLE_FIELDS[t], read as its low
#: accumulator_width bits, signed.
TABLE_FIELDS = ("bias", "multiplier")


@dataclass(frozen=True)
class LaneField:
    """A field of a lane: bits [offset, offset + width), of which the low ``read_width``
    are read."""

    name: str
    offset: int
    width: int
    signed: bool
    read_width: int


def param_lane_fields(accumulator_width: int) -> tuple[LaneField, ...]:
    """The fields of a parameter lane on an NPU with ``accumulator_width``-bit
    accumulators, lowest first; the lane's width is the last field's end."""
    fields, offset = [], 0
    for name, width, signed, read_width in PARAM_LANE_FIELDS:
        width = accumulator_width if width is None else width
        fields.append(LaneField(name, offset, width, signed,
                                width if read_width is None else read_width))
        offset += width
    return tuple(fields)


def param_lane_description() -> str:
    """The parameter lane in words, for docs/MEMORY_MAP.md."""
    parts = []
    for name, width, signed, read_width in PARAM_LANE_FIELDS:
        text = (f"{name}: {'accumulator_width' if width is None else width} bits "
                f"{'signed' if signed else 'unsigned'}")
        if read_width is not None:
            text += f", of which the low {read_width} are used"
        parts.append(text)
    return f"A parameter lane is ({', '.join(parts)}), {PARAM_LANE_FIELDS[0][0]} lowest."
