"""Layouts shared by the gateware, the golden model, the host and the docs are defined once
(sw/layouts.py, sw/memory_map.py, sw/protocol.py, sw/timing.py); these tests hold every
reader to them."""

import enum
import struct

import numpy as np
import pytest
from amaranth import Const, Module, Shape, Signal
from amaranth.sim import Simulator

from npugen.arith import requantize
from npugen.config import NpuConfig
from npugen.golden import GoldenNpu
from npugen.hw.host_port import _flags_word
from npugen.hw.link import crc16_step
from npugen.hw.requant import Requantizer
from npugen.isa import assemble, encode_program
from npugen.job import lane_format, pack_entries, unpack_entries
from npugen.layouts import PARAM_LANE_FIELDS, SHIFT_BITS, param_lane_fields
from npugen.memory_map import (
    COUNTER_NAMES,
    REGION_SHIFT,
    Control,
    Reg,
    Region,
    Status,
    address,
    check_register_map,
    flag_bit,
    identity_words,
    register_bits,
    register_spans,
)
from npugen.protocol import (
    COUNTERS_WORDS,
    CRC_BYTES,
    CRC_INITIAL,
    MAX_PAYLOAD_BYTES,
    READ_FORMAT,
    READ_PAYLOAD_BYTES,
    REQUEST_HEADER_BYTES,
    RESPONSE_HEADER_BYTES,
    STATUS_ANSWER,
    STATUS_WORDS,
    Command,
    LinkStatus,
    ResponseParser,
    crc16,
    encode_request,
    encode_response,
)


@pytest.mark.parametrize("accumulator_width", [16, 24, 32])
def test_param_lane_fields_tile_the_lane(accumulator_width):
    fields = param_lane_fields(accumulator_width)
    assert [f.name for f in fields] == [name for name, *_ in PARAM_LANE_FIELDS]
    offset = 0
    for f in fields:
        assert f.offset == offset and 1 <= f.read_width <= f.width
        assert f.read_width == f.width or not f.signed  # only an unsigned field's low bits
        offset += f.width
    config = NpuConfig(accumulator_width=accumulator_width)
    assert config.param_lane_width == offset
    assert lane_format(config, Region.PARAMS) == tuple((f.width, f.signed) for f in fields)


def test_requantizer_ports_take_the_bits_read():
    requantizer = Requantizer(accumulator_width=24, output_width=8)
    for f in param_lane_fields(24):
        shape = Shape.cast(requantizer.signature.members[f.name].shape)
        assert (shape.width, shape.signed) == (f.read_width, f.signed), f.name


def test_shift_field_bits_above_those_read_are_ignored():
    """A shift with bits set above SHIFT_BITS packs into the lane (the field is wider) and
    requantizes as its low SHIFT_BITS bits in the golden model, as in the gateware."""
    config = NpuConfig(rows=4, cols=4, feature_maps=False, param_depth=16)
    shift = next(f for f in param_lane_fields(config.accumulator_width) if f.name == "shift")
    assert shift.read_width == SHIFT_BITS < shift.width
    rng = np.random.default_rng(5)
    acc = rng.integers(-3000, 3000, (8, 4))
    outputs = []
    for high in (0, 7):
        params = np.stack([np.zeros(4, dtype=np.int64), np.full(4, 1 << 30),
                           np.arange(4) + (high << SHIFT_BITS)], axis=1)[None]
        words = pack_entries(config, Region.PARAMS, params)
        assert np.array_equal(unpack_entries(config, Region.PARAMS, words), params)
        npu = GoldenNpu(config)
        npu.write(Region.ACCUMULATORS, 0, acc)
        npu.write(Region.PARAMS, 0, params)
        npu.write(Region.INSTRUCTIONS, 0, encode_program(assemble(
            "SETPP clamp_min=-128 clamp_max=127\nREQUANT count=8\nHALT")))
        npu.run()
        outputs.append(npu.read(Region.ACTIVATIONS, 0, 8))
    assert np.array_equal(outputs[0], outputs[1])
    assert np.array_equal(outputs[0], requantize(
        acc, 0, np.full(4, 1 << 30), np.arange(4), 0, -128, 127, accumulator_width=32,
        output_width=8, rounding="double"))


def test_flag_bits():
    assert [flag_bit(flag) for flag in Status] == list(range(len(Status)))
    assert [flag_bit(flag) for flag in Control] == [0, 1]
    with pytest.raises(ValueError, match="is not a single bit"):
        flag_bit(Status.RUNNING | Status.DONE)


def test_status_word_places_each_flag_at_its_bit():
    """The gateware builds STATUS by each flag's bit, whatever the order of the enum."""

    class Flags(enum.IntFlag):
        HIGH = 8
        LOW = 1
        MIDDLE = 2

    word = _flags_word(Flags, {Flags.LOW: Const(1, 1), Flags.MIDDLE: Const(0, 1),
                               Flags.HIGH: Const(1, 1)})
    assert (len(word), Const.cast(word).value) == (4, 0b1001)
    with pytest.raises(ValueError, match="Flags flags without a value: MIDDLE"):
        _flags_word(Flags, {Flags.LOW: Const(1, 1), Flags.HIGH: Const(1, 1)})


def test_register_map_has_no_overlap():
    spans = register_spans()
    check_register_map(spans, 1 << register_bits(NpuConfig()))
    assert spans["CONFIG"][1] == len(identity_words(NpuConfig())) - 2
    assert set(spans) >= {reg.name for reg in Reg if reg is not Reg.COUNTERS}


@pytest.mark.parametrize("spans, words, message", [
    # A fifth counter after the last one lands on UPTIME.
    (register_spans(COUNTER_NAMES + ("extra",)), 1 << 24,
     "register UPTIME at 0x58 overlaps EXTRA \\(0x58 to 0x59\\)"),
    ({**register_spans(), "CONFIG": (2, 0x40)}, 1 << 24,
     "register CONTROL at 0x40 overlaps CONFIG \\(0x02 to 0x41\\)"),
    (register_spans(), 0x58, "register UPTIME \\(0x58 to 0x59\\) reaches past the "
                             "registers' 88 words"),
    ({**register_spans(), "CONFIG": (3, 14)}, 1 << 24, "the identity block must be contiguous"),
])
def test_register_map_checker_refuses_overlaps(spans, words, message):
    with pytest.raises(ValueError, match=message):
        check_register_map(spans, words)


def test_status_and_counters_answers_read_the_register_map():
    """The link answers STATUS with consecutive registers from STATUS, then its run token,
    and COUNTERS with every counter's words from COUNTERS."""
    registers = STATUS_ANSWER[:-1]
    assert [Reg[name] for name in registers] == list(range(Reg.STATUS,
                                                           Reg.STATUS + len(registers)))
    assert STATUS_ANSWER[-1] == "RUN_TOKEN" and STATUS_WORDS == len(STATUS_ANSWER)
    spans = register_spans()
    counters = [spans[name.upper()] for name in COUNTER_NAMES]
    assert counters[0][0] == Reg.COUNTERS
    assert sum(words for _, words in counters) == COUNTERS_WORDS


def test_frame_sizes():
    payload = struct.pack(READ_FORMAT, 0x04000000, 2)
    assert len(payload) == READ_PAYLOAD_BYTES
    request = encode_request(Command.READ, 7, payload)
    assert len(request) == REQUEST_HEADER_BYTES + len(payload) + CRC_BYTES
    response = encode_response(Command.READ, 7, 0, b"\x01\x02\x03\x04")
    assert len(response) == RESPONSE_HEADER_BYTES + 4 + CRC_BYTES
    (frame,) = ResponseParser().feed(response)
    assert frame.payload == b"\x01\x02\x03\x04"


def test_response_frames_are_checked():
    """encode_response refuses what no device sends; the parser keeps an unknown status."""
    with pytest.raises(ValueError, match=f"payload of {MAX_PAYLOAD_BYTES + 1} bytes exceeds"):
        encode_response(Command.READ, 1, 0, bytes(MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(ValueError, match="status 256 is not a byte"):
        encode_response(Command.READ, 1, 256)
    (frame,) = ResponseParser().feed(encode_response(Command.READ, 1, 200))
    assert frame.status == 200 and not isinstance(frame.status, LinkStatus)
    (frame,) = ResponseParser().feed(encode_response(Command.READ, 1, 3))
    assert frame.status is LinkStatus.BAD_ADDRESS


def test_gateware_crc_step_is_the_protocol_crc():
    m = Module()
    crc, byte, out = Signal(16), Signal(8), Signal(16)
    m.d.comb += out.eq(crc16_step(crc, byte))
    data = b"123456789"

    async def testbench(ctx):
        value = CRC_INITIAL
        for b in data:
            ctx.set(crc, value)
            ctx.set(byte, b)
            value = ctx.get(out)
        assert value == crc16(data) == 0x29B1

    sim = Simulator(m)
    sim.add_testbench(testbench)
    sim.run()


def test_an_address_stays_in_its_region():
    """An offset past the region's address bits would name another region's word."""
    assert address(Region.WEIGHTS, (1 << REGION_SHIFT) - 1) >> REGION_SHIFT == Region.WEIGHTS
    for offset in (1 << REGION_SHIFT, -1):
        with pytest.raises(ValueError, match=f"offset {offset} is outside a region"):
            address(Region.WEIGHTS, offset)
