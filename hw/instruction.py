"""Instruction fields as slices of the instruction word (``npugen.isa.FORMATS`` is the
table): the units decode the fields they read themselves."""

from ..isa import FORMATS, Opcode

__all__ = ["instruction_field"]


def instruction_field(word, opcode: Opcode, name: str):
    """Slice of instruction ``word`` holding field ``name`` of ``opcode``, signed if the
    field is."""
    f = next(f for f in FORMATS[opcode] if f.name == name)
    value = word[f.offset:f.offset + f.width]
    return value.as_signed() if f.signed else value
