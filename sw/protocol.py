"""The host-link protocol, defined once: frames, commands, status codes, CRC.

The gateware's protocol engine (``npugen.hw.link``), the driver and ``docs/PROTOCOL.md``
all read this module. Bytes travel over a UART (8N1).

Request:  ``A5 | cmd | seq | len (u16 LE) | payload[len] | crc (u16 LE)``
Response: ``5A | cmd | seq | status | len (u16 LE) | payload[len] | crc (u16 LE)``

The CRC is CRC-16/CCITT-FALSE (polynomial 0x1021, initial value 0xFFFF, no reflection,
no final XOR) over every byte after the sync byte and before the CRC. Multi-byte fields
and 32-bit words are little-endian.
"""

from __future__ import annotations

import binascii
import enum
import struct
from dataclasses import dataclass

__all__ = [
    "REQUEST_SYNC", "RESPONSE_SYNC", "MAX_PAYLOAD_WORDS", "MAX_PAYLOAD_BYTES", "RX_FIFO_BYTES",
    "TRUNCATION_BYTE_TIMES", "Command",
    "LinkStatus", "LINK_COUNTERS", "crc16", "encode_request", "Response", "ResponseParser",
    "FrameError", "uart_divisor",
]

REQUEST_SYNC = 0xA5
RESPONSE_SYNC = 0x5A
#: The largest payload a request or response carries: the engine's frame buffer.
MAX_PAYLOAD_WORDS = 256
MAX_PAYLOAD_BYTES = 4 * MAX_PAYLOAD_WORDS + 4  # WRITE: address + 256 words
#: The device buffers this many received bytes: a host may keep one whole request in
#: flight beyond the one being executed.
RX_FIFO_BYTES = 2048
#: A frame is dropped as truncated when no byte of it comes for this many byte times
#: (USB-serial bridges and the virtual board deliver bytes in bursts with gaps).
TRUNCATION_BYTE_TIMES = 2000
MAX_BAUD_ERROR = 0.02


class Command(enum.IntEnum):
    """Request commands. Payloads and answers in docs/PROTOCOL.md."""

    IDENTIFY = 0x01    # → identity block words
    WRITE = 0x02       # address u32, words... → (nothing)
    READ = 0x03        # address u32, count u16 → words
    START = 0x04       # pc u32 → (nothing); a repeat with the same seq does not restart
    STATUS = 0x05      # → STATUS register, PC
    COUNTERS = 0x06    # → performance counters (64-bit each, low word first)
    RESET = 0x07       # → (nothing): abort any run, clear the link's error counters
    LINK_STATUS = 0x08  # → the link's error counters (LINK_COUNTERS order)


class LinkStatus(enum.IntEnum):
    OK = 0
    UNKNOWN_COMMAND = 1
    BAD_LENGTH = 2      # payload length wrong for the command, or READ count 0 or too large


#: The engine's error counters, as LINK_STATUS returns them.
LINK_COUNTERS = ("noise_bytes", "bad_crc", "oversize", "truncated", "unknown_command",
                 "framing_errors")


class FrameError(ValueError):
    """A response that is not a valid frame."""


def crc16(data: bytes, value: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE."""
    return binascii.crc_hqx(bytes(data), value)


def encode_request(command: Command, seq: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    body = struct.pack("<BBH", int(command), seq & 0xFF, len(payload)) + payload
    return bytes([REQUEST_SYNC]) + body + struct.pack("<H", crc16(body))


@dataclass(frozen=True)
class Response:
    command: int
    seq: int
    status: LinkStatus
    payload: bytes

    def words(self) -> list[int]:
        count = len(self.payload) // 4
        return list(struct.unpack(f"<{count}I", self.payload[:4 * count]))


def encode_response(command: int, seq: int, status: int, payload: bytes = b"") -> bytes:
    body = struct.pack("<BBBH", command, seq & 0xFF, status, len(payload)) + payload
    return bytes([RESPONSE_SYNC]) + body + struct.pack("<H", crc16(body))


class ResponseParser:
    """Incremental parser of response frames; skips bytes until a valid frame."""

    HEADER = 6  # sync, cmd, seq, status, len

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.dropped = 0

    def feed(self, data: bytes) -> list[Response]:
        self.buffer += data
        frames = []
        while True:
            start = self.buffer.find(RESPONSE_SYNC)
            if start < 0:
                self.dropped += len(self.buffer)
                self.buffer.clear()
                return frames
            if start:
                self.dropped += start
                del self.buffer[:start]
            if len(self.buffer) < self.HEADER:
                return frames
            command, seq, status, length = struct.unpack_from("<BBBH", self.buffer, 1)
            if length > MAX_PAYLOAD_BYTES:
                self.dropped += 1
                del self.buffer[:1]
                continue
            end = self.HEADER + length + 2
            if len(self.buffer) < end:
                return frames
            body = bytes(self.buffer[1:self.HEADER + length])
            (crc,) = struct.unpack_from("<H", self.buffer, self.HEADER + length)
            if crc != crc16(body):
                self.dropped += 1
                del self.buffer[:1]
                continue
            try:
                status = LinkStatus(status)
            except ValueError:
                status = LinkStatus.UNKNOWN_COMMAND
            frames.append(Response(command, seq, status, body[5:]))
            del self.buffer[:end]


def uart_divisor(clock_hz: float, baud: int) -> int:
    """Clock cycles per bit; raises ``ValueError`` if the baud rate is off by more than 2 %."""
    if baud <= 0 or clock_hz <= 0:
        raise ValueError(f"clock ({clock_hz} Hz) and baud ({baud}) must be positive")
    divisor = round(clock_hz / baud)
    if divisor < 4:
        raise ValueError(f"baud {baud} is too fast for a {clock_hz:.0f} Hz clock "
                         f"(at least 4 clock cycles a bit)")
    error = abs(clock_hz / divisor - baud) / baud
    if error > MAX_BAUD_ERROR:
        raise ValueError(f"baud {baud} from a {clock_hz:.0f} Hz clock is off by "
                         f"{100 * error:.1f} % (divisor {divisor}); the limit is "
                         f"{100 * MAX_BAUD_ERROR:.0f} %")
    return divisor
