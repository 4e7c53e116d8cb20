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

from .memory_map import COUNTER_BITS, COUNTER_NAMES

__all__ = [
    "REQUEST_SYNC", "RESPONSE_SYNC", "MAX_PAYLOAD_WORDS", "MAX_PAYLOAD_BYTES", "RX_FIFO_BYTES",
    "TRUNCATION_BYTE_TIMES", "RUN_TOKEN_BITS", "STATUS_WORDS", "STATUS_ANSWER",
    "COUNTERS_WORDS", "REQUEST_HEADER_FORMAT", "RESPONSE_HEADER_FORMAT",
    "REQUEST_HEADER_BYTES", "RESPONSE_HEADER_BYTES", "CRC_FORMAT", "CRC_BYTES",
    "CRC_POLYNOMIAL", "CRC_INITIAL", "WRITE_ADDRESS_FORMAT", "WRITE_ADDRESS_BYTES",
    "READ_FORMAT", "READ_PAYLOAD_BYTES", "START_FORMAT", "START_PAYLOAD_BYTES", "Command",
    "LinkStatus", "LINK_COUNTERS", "LINK_COUNTER_BITS", "crc16", "encode_request",
    "encode_response", "Response",
    "ResponseParser",
    "FrameError", "uart_divisor", "write_request_bytes", "UART_BITS_PER_BYTE",
]

REQUEST_SYNC = 0xA5
RESPONSE_SYNC = 0x5A
#: A frame up to its payload (struct formats): sync, command, seq, length (a request);
#: sync, command, seq, status, length (a response). Then the payload and the CRC.
REQUEST_HEADER_FORMAT = "<BBBH"
RESPONSE_HEADER_FORMAT = "<BBBBH"
REQUEST_HEADER_BYTES = struct.calcsize(REQUEST_HEADER_FORMAT)
RESPONSE_HEADER_BYTES = struct.calcsize(RESPONSE_HEADER_FORMAT)
#: CRC-16/CCITT-FALSE (``binascii.crc_hqx``): polynomial, initial value; not reflected,
#: no final XOR. It ends every frame.
CRC_POLYNOMIAL = 0x1021
CRC_INITIAL = 0xFFFF
CRC_FORMAT = "<H"
CRC_BYTES = struct.calcsize(CRC_FORMAT)
#: Payloads of fixed layout (struct formats): WRITE's address (its words follow), READ's
#: address and count, START's pc and run token.
WRITE_ADDRESS_FORMAT = "<I"
READ_FORMAT = "<IH"
START_FORMAT = "<II"
WRITE_ADDRESS_BYTES = struct.calcsize(WRITE_ADDRESS_FORMAT)
READ_PAYLOAD_BYTES = struct.calcsize(READ_FORMAT)
START_PAYLOAD_BYTES = struct.calcsize(START_FORMAT)
#: The largest payload a request or response carries: the engine's frame buffer. A WRITE's
#: address and its words fill 256 buffer words, two iCE40 EBRs (257 took four: the
#: UP5K's KWS profile needs the two, docs/BOARDS.md).
MAX_PAYLOAD_WORDS = 255
MAX_PAYLOAD_BYTES = 4 * MAX_PAYLOAD_WORDS + WRITE_ADDRESS_BYTES  # WRITE: address + words
#: The device buffers this many received bytes: a host may keep one whole request in
#: flight beyond the one being executed.
RX_FIFO_BYTES = 2048
#: A frame is dropped as truncated when no byte of it comes for this many byte times
#: (USB-serial bridges and the virtual board deliver bytes in bursts with gaps).
TRUNCATION_BYTE_TIMES = 2000
MAX_BAUD_ERROR = 0.02
#: A START names its run with a token of this many bits (1 to 2**bits − 1; 0 names no run).
#: The device keeps the token of the last run it started: STATUS reports it, a START with
#: the same token is a retry and does not restart, RESET sets it to 0.
RUN_TOKEN_BITS = 8
#: Words of a STATUS answer (and of START's): the registers STATUS, START_PC and PC (at
#: consecutive offsets), then the link's run token.
STATUS_ANSWER = ("STATUS", "START_PC", "PC", "RUN_TOKEN")
STATUS_WORDS = len(STATUS_ANSWER)
#: Words of a COUNTERS answer: every performance counter, low word then high word.
COUNTERS_WORDS = 2 * len(COUNTER_NAMES)


class Command(enum.IntEnum):
    """Request commands. Payloads and answers in docs/PROTOCOL.md."""

    IDENTIFY = 0x01    # → identity block words
    WRITE = 0x02       # address u32, words... → (nothing)
    READ = 0x03        # address u32, count u16 → words
    START = 0x04       # pc u32, run token u32 → STATUS words; a repeated token: no restart
    STATUS = 0x05      # → STATUS, START_PC, PC, RUN_TOKEN
    COUNTERS = 0x06    # → performance counters (two words each, low word first)
    RESET = 0x07       # → (nothing): abort any run, clear the link's counters and token
    LINK_STATUS = 0x08  # → the link's error counters (LINK_COUNTERS order)


class LinkStatus(enum.IntEnum):
    """The status byte of a response (meanings in docs/PROTOCOL.md). :class:`ResponseParser`
    keeps a status byte that is none of these as a plain ``int``."""

    OK = 0
    UNKNOWN_COMMAND = 1
    BAD_LENGTH = 2      # payload length wrong for the command, or READ count 0 or too large
    BAD_ADDRESS = 3     # READ or WRITE reaches past a memory or the registers, or no region
    BUSY = 4            # START while a run is on; the virtual board serving another client
    BAD_TOKEN = 5       # START with run token 0 or wider than RUN_TOKEN_BITS


#: The engine's error counters, as LINK_STATUS returns them.
LINK_COUNTERS = ("noise_bytes", "bad_crc", "oversize", "truncated", "unknown_command",
                 "framing_errors", "bad_address")
#: Width of each link error counter: it counts modulo 2**16 (LINK_STATUS words read 0 above).
LINK_COUNTER_BITS = 16


class FrameError(ValueError):
    """A response that is not a valid frame."""


def crc16(data: bytes, value: int = CRC_INITIAL) -> int:
    """CRC-16/CCITT-FALSE (polynomial CRC_POLYNOMIAL: ``binascii.crc_hqx``'s)."""
    return binascii.crc_hqx(bytes(data), value)


def _frame(header: bytes, payload: bytes) -> bytes:
    """A frame: its header and payload, then the CRC of both after the sync byte."""
    body = header[1:] + payload
    return header[:1] + body + struct.pack(CRC_FORMAT, crc16(body))


def encode_request(command: Command, seq: int, payload: bytes = b"") -> bytes:
    """A request frame: header (``seq`` taken modulo 256), ``payload`` and CRC. Raises
    ``ValueError`` if the payload is longer than MAX_PAYLOAD_BYTES."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return _frame(struct.pack(REQUEST_HEADER_FORMAT, REQUEST_SYNC, int(command), seq & 0xFF,
                              len(payload)), payload)


@dataclass(frozen=True)
class Response:
    """A response frame as :class:`ResponseParser` decodes it: the command code and
    sequence number it echoes, the device's status (an ``int`` if it is none this host
    knows), and the payload."""

    command: int
    seq: int
    status: LinkStatus | int
    payload: bytes

    def words(self) -> list[int]:
        """The payload as 32-bit little-endian words; bytes past the last whole word are
        dropped."""
        count = len(self.payload) // 4
        return list(struct.unpack(f"<{count}I", self.payload[:4 * count]))


def encode_response(command: int, seq: int, status: int, payload: bytes = b"") -> bytes:
    """A response frame as the device sends it (the virtual board's BUSY answer; tests
    that play the device): ``seq`` is taken modulo 256. Raises ``ValueError`` if the
    payload is longer than MAX_PAYLOAD_BYTES or the status is not a byte."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    if not 0 <= status <= 0xFF:
        raise ValueError(f"status {status} is not a byte (0 to 255)")
    return _frame(struct.pack(RESPONSE_HEADER_FORMAT, RESPONSE_SYNC, command, seq & 0xFF,
                              status, len(payload)), payload)


class ResponseParser:
    """Incremental parser of response frames; skips bytes until a valid frame."""

    HEADER = RESPONSE_HEADER_BYTES

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
            _, command, seq, status, length = struct.unpack_from(RESPONSE_HEADER_FORMAT,
                                                                 self.buffer)
            if length > MAX_PAYLOAD_BYTES:
                self.dropped += 1
                del self.buffer[:1]
                continue
            end = self.HEADER + length + CRC_BYTES
            if len(self.buffer) < end:
                return frames
            body = bytes(self.buffer[1:self.HEADER + length])
            (crc,) = struct.unpack_from(CRC_FORMAT, self.buffer, self.HEADER + length)
            if crc != crc16(body):
                self.dropped += 1
                del self.buffer[:1]
                continue
            try:
                status = LinkStatus(status)
            except ValueError:
                pass  # a status of a newer device: kept as the int it is
            frames.append(Response(command, seq, status, body[self.HEADER - 1:]))
            del self.buffer[:end]


#: Bits on the wire per byte (8N1: a start bit, eight data bits, a stop bit).
UART_BITS_PER_BYTE = 10


def write_request_bytes(words: int) -> int:
    """Bytes of the WRITE requests that carry ``words`` consecutive words (as many
    frames of MAX_PAYLOAD_WORDS as they take)."""
    frames = -(-words // MAX_PAYLOAD_WORDS)
    return 4 * words + frames * (REQUEST_HEADER_BYTES + WRITE_ADDRESS_BYTES + CRC_BYTES)


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


#: Payload and answer of each command, for the docs.
COMMAND_DOCS: dict[Command, tuple[str, str, str]] = {
    Command.IDENTIFY: ("(empty)", "the identity block: MAGIC, ISA_VERSION, every NpuConfig "
                       "field (see MEMORY_MAP.md)", "Compare with the program's config."),
    Command.WRITE: (f"address u32, then 1 to {MAX_PAYLOAD_WORDS} words u32", "(empty)",
                    "Words go to address, address+1, ... (host-port word addresses). "
                    "BAD_ADDRESS if they reach past the region: nothing is written."),
    Command.READ: (f"address u32, count u16 (1 to {MAX_PAYLOAD_WORDS})", "count words",
                   "From address, address+1, ... BAD_ADDRESS if they reach past the region."),
    Command.START: (f"pc u32, run token u32 (1 to 2^{RUN_TOKEN_BITS} − 1)",
                    f"{STATUS_WORDS} words, as STATUS",
                    "START_PC ← pc, CONTROL ← START, RUN_TOKEN ← token. A START with the "
                    "token of the last run is a retry: it does not restart, it answers the "
                    "run's state. BUSY during another run; BAD_TOKEN for token 0 or a wider "
                    "one."),
    Command.STATUS: ("(empty)", ", ".join(STATUS_ANSWER),
                     "Poll STATUS.RUNNING until clear; RUN_TOKEN names the run it describes "
                     "(0: none since RESET)."),
    Command.COUNTERS: ("(empty)", f"{COUNTERS_WORDS} words: " + ", ".join(COUNTER_NAMES)
                       + f" ({COUNTER_BITS} bits each, low word first)", ""),
    Command.RESET: ("(empty)", "(empty)",
                    "Abort any run (CONTROL ← ABORT), clear the link's error counters, "
                    "RUN_TOKEN ← 0."),
    Command.LINK_STATUS: ("(empty)", f"{len(LINK_COUNTERS)} words: "
                          + ", ".join(LINK_COUNTERS),
                          f"The link's error counters, modulo 2^{LINK_COUNTER_BITS}; no words "
                          "from an SoC generated with `link_error_counters = false`."),
}


def protocol_markdown() -> str:
    """``docs/PROTOCOL.md``, generated from this module."""
    example = encode_request(Command.READ, 7, struct.pack(READ_FORMAT, 0x04000000, 2))
    answer = encode_response(Command.READ, 7, LinkStatus.OK, struct.pack("<2I", 1, 2))
    lines = [
        "# Host-link protocol",
        "",
        "Generated from `sw/protocol.py` by `python -c 'from npugen.protocol import "
        "protocol_markdown as p; print(p(), end=\"\")' > docs/PROTOCOL.md`; a test checks "
        "that it is current. The driver (`sw/driver.py`) and the gateware engine "
        "(`hw/link.py`) use the same definitions.",
        "",
        "## Physical layer",
        "",
        "UART, 8 data bits, no parity, 1 stop bit, LSB first. The baud rate is set where "
        "the SoC is built for a board (`npugen build --baud`, default 115200, the driver's "
        "default too; the host opens the port at the same rate with `--baud`); the clock "
        "divisor "
        "must be within "
        f"{100 * MAX_BAUD_ERROR:.0f} % of the nominal rate. The virtual board "
        "(`npugen serve-sim`) carries the same bytes over TCP on 127.0.0.1; the bytes "
        "still cross the simulated UART.",
        "",
        "## Frames",
        "",
        "All multi-byte fields are little-endian.",
        "",
        "| frame | layout |",
        "|---|---|",
        f"| request | `{REQUEST_SYNC:#04x}` · command u8 · seq u8 · length u16 · payload "
        f"(length bytes, at most {MAX_PAYLOAD_BYTES}) · crc u16 |",
        f"| response | `{RESPONSE_SYNC:#04x}` · command u8 · seq u8 · status u8 · length u16 "
        "· payload · crc u16 |",
        "",
        f"`crc` is CRC-16/CCITT-FALSE (polynomial {CRC_POLYNOMIAL:#06x}, initial value "
        f"0x{CRC_INITIAL:04X}, not "
        "reflected, no final XOR; `crc16(b\"123456789\") == 0x29B1`) over every byte "
        "after the sync byte and before the CRC. A response echoes the request's command "
        "and seq. Words in payloads are u32.",
        "",
        "Example: READ of 2 words at 0x04000000 (accumulator entry 0), seq 7:",
        "",
        "```",
        f"request  {example.hex(' ')}",
        f"response {answer.hex(' ')}   (words 1 and 2)",
        "```",
        "",
        "## Commands",
        "",
        "| code | command | payload | answer | notes |",
        "|---|---|---|---|---|",
    ]
    for command in Command:
        payload, reply, notes = COMMAND_DOCS[command]
        lines.append(f"| {int(command):#04x} | {command.name} | {payload} | {reply} | {notes} |")
    lines += [
        "",
        "Registers and memories are reached with WRITE and READ at the addresses of "
        "[MEMORY_MAP.md](MEMORY_MAP.md) (word addresses: region << 24 | offset).",
        "",
        "## Status codes",
        "",
        "| code | status | meaning |",
        "|---|---|---|",
        f"| {LinkStatus.OK} | OK | done |",
        f"| {LinkStatus.UNKNOWN_COMMAND} | UNKNOWN_COMMAND | the command code is not above |",
        f"| {LinkStatus.BAD_LENGTH} | BAD_LENGTH | the payload length does not fit the "
        f"command, or a READ count is 0 or above {MAX_PAYLOAD_WORDS} |",
        f"| {LinkStatus.BAD_ADDRESS} | BAD_ADDRESS | a READ or WRITE reaches past the "
        "registers' block or a memory's depth, or names no region (MEMORY_MAP.md); nothing "
        "moves and `bad_address` counts it |",
        f"| {LinkStatus.BUSY} | BUSY | START while a run is on; from the virtual board, with "
        "command 0 and seq 0: another client holds it |",
        f"| {LinkStatus.BAD_TOKEN} | BAD_TOKEN | START's run token is 0 or wider than "
        f"{RUN_TOKEN_BITS} bits |",
        "",
        "## Errors and recovery",
        "",
        "The device checks a request's CRC before executing anything: a corrupted WRITE "
        "never reaches memory. It drops, counts (LINK_STATUS; an SoC generated with "
        "`link_error_counters = false` only sets its error flag) and does not answer:",
        "",
        "- bytes outside a frame (`noise_bytes`): it hunts for the next sync byte;",
        "- a frame whose CRC does not match (`bad_crc`);",
        f"- a length above {MAX_PAYLOAD_BYTES} (`oversize`);",
        f"- a frame with no byte for {TRUNCATION_BYTE_TIMES} byte times (`truncated`);",
        "- UART bytes with a bad stop bit (`framing_errors`).",
        "",
        "An unknown command is counted (`unknown_command`) and answered with "
        "UNKNOWN_COMMAND. After any of these the next valid frame is handled normally.",
        "",
        "A host resends a request it got no valid answer to (the driver waits 5 s, three "
        "times). WRITE and READ are idempotent; START is not, so each START names its run "
        f"with a token ({RUN_TOKEN_BITS} bits, not 0) and the device keeps the token of the "
        "last run it started: a START with that token is the retry of a START whose answer "
        "was lost, and the device answers it with the run's state instead of starting again.",
        "",
        "## Run identity",
        "",
        "A run's outputs must never be taken for another's: the sequence number (8 bits, it "
        "wraps; every host starts from 1) cannot tell runs apart, the run token does. The "
        "driver:",
        "",
        "1. before its first upload or run, reads STATUS: the device's last token, and "
        "RUNNING (a run left by a host gone before: it is aborted);",
        "2. starts each run with the token after the last one the device had (never 0, never "
        "the device's last), and checks that START's answer carries it;",
        "3. checks the token in every STATUS it polls, and once more after reading the "
        "outputs: a different token means the device was reset (RESET sets it to 0) or "
        "another host started a run, and the outputs are discarded with an error.",
        "",
        "## Flow control",
        "",
        f"The device buffers {RX_FIFO_BYTES} received bytes, so a host may send the next "
        "request (at most one whole frame) before the answer to the previous one arrives; "
        "answers come in order. With two WRITEs in flight the driver uploads at about 0.96 of the "
        "line rate (`npugen bench --only link`).",
        "",
        "## A run, step by step",
        "",
        "1. IDENTIFY; check MAGIC, ISA_VERSION and the config against the program's.",
        "2. WRITE the program's segments (instructions, weights, parameters), READ them back "
        "and compare (the driver compares CRCs).",
        "3. For each batch: WRITE the input activations; START (pc 0, a new run token); "
        "poll STATUS until RUNNING is clear (DONE set; ILLEGAL_INSTRUCTION or HOST_CONFLICT "
        "mean an error), checking the token; READ the output activations and COUNTERS; "
        "STATUS once more: the same token and state.",
        "",
    ]
    return "\n".join(lines)
