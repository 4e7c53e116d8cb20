from pathlib import Path

import numpy as np
import pytest

from npugen.isa import (
    FORMATS,
    Instruction,
    Opcode,
    assemble,
    decode_program,
    disassemble,
    encode_program,
    isa_markdown,
)


def random_instruction(rng: np.random.Generator) -> Instruction:
    opcode = Opcode(int(rng.integers(0, len(Opcode))))
    return Instruction(opcode, {f.name: int(rng.integers(f.low, f.high + 1))
                                for f in FORMATS[opcode]})


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    program = [random_instruction(rng) for _ in range(500)]
    assert decode_program(encode_program(program)) == program


def test_assemble_disassemble_round_trip():
    rng = np.random.default_rng(1)
    program = [random_instruction(rng) for _ in range(200)]
    assert assemble(disassemble(encode_program(program))) == program


def test_fields_land_where_the_table_says():
    word = Instruction(Opcode.MATMUL, {"count": 3, "acc_addr": 0xABCD, "bank": 1}).encode()
    assert word & 0xF == Opcode.MATMUL
    assert (word >> 40) & 0xFFFF == 3 and (word >> 24) & 0xFFFF == 0xABCD and (word >> 4) & 1


def test_requant_single_rounding_is_bit_7():
    word = Instruction(Opcode.REQUANT, {"count": 1, "single_rounding": 1}).encode()
    assert (word >> 7) & 1 and not (word >> 4) & 0b111
    assert not (Instruction(Opcode.REQUANT, {"count": 1}).encode() >> 7) & 1


def test_signed_fields():
    ins = Instruction(Opcode.SETPP, {"zero_point": -128, "clamp_min": -32768})
    assert Instruction.decode(ins.encode()) == ins


@pytest.mark.parametrize("text, message", [
    ("FOO x=1", r"line 1: unknown instruction 'FOO'"),
    ("MATMUL count=70000", r"line 1: MATMUL.count must be between 0 and 65535, not 70000"),
    ("HALT\nLOADW bank=2", r"line 2: LOADW.bank must be between 0 and 1, not 2"),
    ("LOADW lane=1", r"line 1: LOADW has no field lane"),
    ("MATMUL count=", r"line 1: cannot parse"),
])
def test_assembler_errors_name_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        assemble(text)


def test_unknown_opcode_word():
    with pytest.raises(ValueError, match="unknown opcode 15"):
        Instruction.decode(15)


def test_docs_isa_is_generated_from_the_tables():
    docs = Path(__file__).resolve().parents[1] / "docs" / "ISA.md"
    assert docs.read_text() == isa_markdown(), "regenerate: python -m npugen.isa > docs/ISA.md"


def test_docs_memory_map_is_generated():
    from npugen.memory_map import memory_map_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "MEMORY_MAP.md"
    assert docs.read_text() == memory_map_markdown()


def test_docs_protocol_is_generated():
    from npugen.protocol import crc16, protocol_markdown

    assert crc16(b"123456789") == 0x29B1  # the CRC-16/CCITT-FALSE check value
    docs = Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md"
    assert docs.read_text() == protocol_markdown()
