"""The host-link protocol engine: UART byte frames ⇄ the NPU's host port.

Frames are defined in :mod:`npugen.protocol`. A request's payload is buffered and its
CRC checked before anything is executed, so a corrupted WRITE never touches a memory.
Line noise, bad CRCs, oversize lengths, truncated frames (no byte for ``timeout_cycles``)
and unknown commands are dropped and counted; the engine then hunts for the next sync
byte, so the next valid frame always works. A READ or WRITE that reaches past a region is
refused before any word moves, and counted. A START names its run with a token: a START
with the token of the last run is a retry and does not restart, and STATUS reports the
token, so a host never takes another run's outputs for its own.
"""

from amaranth import Array, Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..memory_map import REGION_SHIFT, Control, Reg, Region, address
from ..protocol import (
    COUNTERS_WORDS,
    CRC_INITIAL,
    CRC_POLYNOMIAL,
    LINK_COUNTER_BITS,
    LINK_COUNTERS,
    MAX_PAYLOAD_BYTES,
    MAX_PAYLOAD_WORDS,
    READ_PAYLOAD_BYTES,
    REQUEST_SYNC,
    RESPONSE_HEADER_BYTES,
    RESPONSE_SYNC,
    RUN_TOKEN_BITS,
    START_PAYLOAD_BYTES,
    STATUS_WORDS,
    WRITE_ADDRESS_BYTES,
    Command,
    LinkStatus,
)
from .hostbus import HostBus

__all__ = ["LinkEngine", "crc16_step"]


def _crc16_bytewise(value: int) -> int:
    for _ in range(8):
        value = ((value << 1) & 0xFFFF) ^ (CRC_POLYNOMIAL if value & 0x8000 else 0)
    return value


def crc16_step(crc, byte):
    """CRC-16/CCITT-FALSE of one more byte, as combinational logic.

    The update is linear over GF(2): each output bit is the XOR of the input bits whose
    unit vector sets it, worked out here once (a literal shift-and-XOR loop would nest
    the expression eight deep, which Amaranth lowers in exponential time).
    """
    value = crc ^ Cat(Const(0, 8), byte)
    columns = [_crc16_bytewise(1 << j) for j in range(16)]
    bits = []
    for i in range(16):
        terms = [value[j] for j in range(16) if (columns[j] >> i) & 1]
        bit = terms[0]
        for term in terms[1:]:
            bit = bit ^ term
        bits.append(bit)
    return Cat(*bits)


class LinkEngine(wiring.Component):
    """Parses request frames from ``rx``, drives ``bus``, sends responses on ``tx``.

    ``identity_words``: how many words IDENTIFY returns. ``region_words``: the host words
    each region spans (``npugen.memory_map.region_words``; a power of two costs the least
    logic, other spans add one comparator). ``running``:
    the NPU is running (a START then is refused as BUSY). ``error`` is high once any
    error counter is non-zero (for a status LED).
    """

    rx: In(stream.Signature(8))
    tx: Out(stream.Signature(8))
    bus: Out(HostBus())
    running: In(1)
    framing_error: In(1)
    error: Out(1)

    def __init__(self, *, identity_words: int, timeout_cycles: int,
                 region_words: dict[int, int]):
        if timeout_cycles < 16:
            raise ValueError(f"timeout_cycles must be at least 16, not {timeout_cycles!r}")
        for region, words in region_words.items():
            if words < 1 or words > 1 << REGION_SHIFT:
                raise ValueError(f"region {int(region)} must span 1 to 2**{REGION_SHIFT} "
                                 f"words, not {words!r}")
        self._identity_words = identity_words
        self._timeout = timeout_cycles
        self._region_words = {int(region): words for region, words in region_words.items()}
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.buffer = buffer = Memory(shape=32, depth=MAX_PAYLOAD_WORDS + 1, init=[])
        buffer_write = buffer.write_port()
        buffer_read = buffer.read_port()

        counters = {name: Signal(LINK_COUNTER_BITS, name=f"link_{name}") for name in LINK_COUNTERS}
        counter_array = Array(counters[name] for name in LINK_COUNTERS)
        # Set with any error count, cleared with them by RESET (a flag, not a wide OR).
        error = Signal()
        m.d.comb += self.error.eq(error)
        with m.If(self.framing_error):
            m.d.sync += [counters["framing_errors"].eq(counters["framing_errors"] + 1),
                         error.eq(1)]

        command = Signal(8)
        seq = Signal(8)
        # As narrow as a frame that is not oversize needs.
        length = Signal(range(MAX_PAYLOAD_BYTES + 1))
        # Precomputed when the length arrives, so no subtraction sits in a compare's path.
        last_byte = Signal.like(length)   # length - 1
        last_write = Signal(8)            # words to write - 1
        # It is (length >> 2) less this: the address's words and one.
        write_words_less = WRITE_ADDRESS_BYTES // 4 + 1
        count = Signal.like(length)       # payload bytes received, or words handled
        word = Signal(32)
        crc = Signal(16)
        # One CRC step for the frame received and the response sent (never both at once):
        # the byte it takes is the state's.
        crc_byte = Signal(8)
        crc_next = Signal(16)
        m.d.comb += crc_next.eq(crc16_step(crc, crc_byte))
        crc_received = Signal(16)
        idle = Signal(range(self._timeout + 1))
        # The token of the last run started (0: none since reset).
        run_token = Signal(RUN_TOKEN_BITS)
        start_token = Signal(RUN_TOKEN_BITS)
        start_token_wide = Signal()   # bits set above RUN_TOKEN_BITS
        # A READ or WRITE moves words offset … offset + span (span < 256).
        span = Signal(8)
        low_sum = Signal(9)           # offset[0:8] + span
        # offset + span, for the regions whose span is not a power of two.
        uneven = any(words & (words - 1) for words in self._region_words.values())
        full_sum = Signal(REGION_SHIFT + 1)
        requested = Signal(range(MAX_PAYLOAD_WORDS + 1))
        requested_too_many = Signal()     # count bits above those of `requested` set

        status = Signal(8)
        # Payload words of the response still to send: the header gives it in full, then
        # each word sent counts it down (an equality against 1 ends the payload: no
        # subtraction on that path).
        response_words = Signal(range(MAX_PAYLOAD_WORDS + 1))
        read_address = Signal(32)
        from_counters = Signal()
        with_token = Signal()      # the answer's last word is the run token (STATUS, START)
        header = Signal(RESPONSE_HEADER_BYTES * 8)
        header_index = Signal(range(RESPONSE_HEADER_BYTES))
        byte_index = Signal(2)
        crc_high = Signal()

        # The next word's address: the range check keeps it inside the region.
        next_offset = read_address[0:REGION_SHIFT].eq(read_address[0:REGION_SHIFT] + 1)

        def count_error(name):
            return [counters[name].eq(counters[name] + 1), error.eq(1)]

        rx = self.rx
        byte = rx.payload
        taken = rx.valid & rx.ready
        # Requests leave through registers: the frame buffer's slow output drives no path
        # into the NPU. A read's answer is taken when rvalid comes (CAPTURE).
        bus = HostBus().flip().create(path=("request",))
        m.d.sync += [self.bus.valid.eq(bus.valid), self.bus.write.eq(bus.write),
                     self.bus.addr.eq(bus.addr), self.bus.wdata.eq(bus.wdata)]
        m.d.comb += [bus.write.eq(0), bus.rdata.eq(self.bus.rdata)]

        def respond(result, words=0, source=None, counters_source=False, token=False):
            """Begin a response: status, payload length in words, where words come from."""
            statements = [status.eq(result), response_words.eq(words), count.eq(0),
                          from_counters.eq(counters_source), with_token.eq(token),
                          header_index.eq(0), crc.eq(CRC_INITIAL)]
            if source is not None:
                statements.append(read_address.eq(source))
            return statements

        with m.FSM():
            # -- Receive ------------------------------------------------------------------
            with m.State("HUNT"):
                m.d.comb += rx.ready.eq(1)
                with m.If(taken):
                    with m.If(byte == REQUEST_SYNC):
                        m.d.sync += [crc.eq(CRC_INITIAL), idle.eq(0)]
                        m.next = "COMMAND"
                    with m.Else():
                        m.d.sync += count_error("noise_bytes")

            receiving = ("COMMAND", "SEQ", "LENGTH0", "LENGTH1", "PAYLOAD", "CRC0", "CRC1")
            for state in receiving:
                with m.State(state):
                    m.d.comb += rx.ready.eq(1)
                    with m.If(taken):
                        m.d.sync += idle.eq(0)
                        if state not in ("CRC0", "CRC1"):
                            m.d.comb += crc_byte.eq(byte)
                            m.d.sync += crc.eq(crc_next)
                    with m.Elif(idle == self._timeout):
                        m.d.sync += count_error("truncated")
                        m.next = "HUNT"
                    with m.Else():
                        m.d.sync += idle.eq(idle + 1)
                    with m.If(taken):
                        if state == "COMMAND":
                            m.d.sync += command.eq(byte)
                            m.next = "SEQ"
                        elif state == "SEQ":
                            m.d.sync += seq.eq(byte)
                            m.next = "LENGTH0"
                        elif state == "LENGTH0":
                            m.d.sync += length[0:8].eq(byte)
                            m.next = "LENGTH1"
                        elif state == "LENGTH1":
                            full = Cat(length[0:8], byte)
                            m.d.sync += [length.eq(full), count.eq(0), word.eq(0),
                                         last_byte.eq(full - 1),
                                         last_write.eq((full >> 2) - write_words_less)]
                            with m.If(full > MAX_PAYLOAD_BYTES):
                                m.d.sync += count_error("oversize")
                                m.next = "HUNT"
                            with m.Elif(full == 0):
                                m.next = "CRC0"
                            with m.Else():
                                m.next = "PAYLOAD"
                        elif state == "PAYLOAD":
                            lane = count[0:2]
                            new_word = Signal(32)
                            m.d.comb += new_word.eq(word)
                            with m.Switch(lane):
                                for k in range(4):
                                    with m.Case(k):
                                        m.d.comb += new_word[8 * k:8 * k + 8].eq(byte)
                            last = count == last_byte
                            m.d.comb += [buffer_write.addr.eq(count >> 2),
                                         buffer_write.data.eq(new_word),
                                         buffer_write.en.eq((lane == 3) | last)]
                            m.d.sync += [word.eq(new_word), count.eq(count + 1)]
                            with m.If(lane == 3):
                                m.d.sync += word.eq(0)
                            with m.If(last):
                                m.next = "CRC0"
                        elif state == "CRC0":
                            m.d.sync += crc_received[0:8].eq(byte)
                            m.next = "CRC1"
                        else:
                            with m.If(Cat(crc_received[0:8], byte) == crc):
                                m.d.comb += buffer_read.addr.eq(0)
                                m.next = "EXECUTE"
                            with m.Else():
                                m.d.sync += count_error("bad_crc")
                                m.next = "HUNT"

            # -- Execute (buffer word 0 is on buffer_read.data) --------------------------------
            first = buffer_read.data
            with m.State("EXECUTE"):
                m.next = "RESPOND"
                with m.Switch(command):
                    with m.Case(Command.IDENTIFY):
                        with m.If(length == 0):
                            m.d.sync += respond(LinkStatus.OK, self._identity_words,
                                                address(Region.REGISTERS, Reg.MAGIC))
                        with m.Else():
                            m.d.sync += respond(LinkStatus.BAD_LENGTH)
                    with m.Case(Command.WRITE):
                        # An address and no words: nothing to do.
                        with m.If(length == WRITE_ADDRESS_BYTES):
                            m.d.sync += respond(LinkStatus.OK)
                        with m.Elif((length > WRITE_ADDRESS_BYTES) & (length[0:2] == 0)):
                            m.d.sync += [read_address.eq(first), count.eq(0),
                                         span.eq(last_write)]
                            m.d.comb += buffer_read.addr.eq(1)
                            m.next = "RANGE"
                        with m.Else():
                            m.d.sync += respond(LinkStatus.BAD_LENGTH)
                    with m.Case(Command.READ):
                        with m.If(length == READ_PAYLOAD_BYTES):
                            m.d.comb += buffer_read.addr.eq(1)
                            m.d.sync += read_address.eq(first)
                            m.next = "READ_COUNT"
                        with m.Else():
                            m.d.sync += respond(LinkStatus.BAD_LENGTH)
                    with m.Case(Command.START):
                        with m.If(length == START_PAYLOAD_BYTES):
                            m.d.comb += buffer_read.addr.eq(1)
                            m.d.sync += read_address.eq(first)   # the pc
                            m.next = "START_TOKEN"
                        with m.Else():
                            m.d.sync += respond(LinkStatus.BAD_LENGTH)
                    with m.Case(Command.STATUS):
                        m.d.sync += respond(LinkStatus.OK, STATUS_WORDS,
                                            address(Region.REGISTERS, Reg.STATUS), token=True)
                    with m.Case(Command.COUNTERS):
                        m.d.sync += respond(LinkStatus.OK, COUNTERS_WORDS,
                                            address(Region.REGISTERS, Reg.COUNTERS))
                    with m.Case(Command.RESET):
                        m.d.comb += [bus.valid.eq(1), bus.write.eq(1),
                                     bus.addr.eq(address(Region.REGISTERS, Reg.CONTROL)),
                                     bus.wdata.eq(Control.ABORT)]
                        m.d.sync += [counter.eq(0) for counter in counters.values()]
                        m.d.sync += error.eq(0)
                        m.d.sync += [respond(LinkStatus.OK), run_token.eq(0)]
                    with m.Case(Command.LINK_STATUS):
                        m.d.sync += respond(LinkStatus.OK, len(LINK_COUNTERS), 0, True)
                    with m.Default():
                        m.d.sync += [*count_error("unknown_command"),
                                     respond(LinkStatus.UNKNOWN_COMMAND)]

            # The token is registered before it is compared: the frame buffer's slow
            # output then feeds only a register.
            with m.State("START_TOKEN"):
                m.d.sync += [start_token.eq(buffer_read.data[0:RUN_TOKEN_BITS]),
                             start_token_wide.eq(buffer_read.data[RUN_TOKEN_BITS:].any())]
                m.next = "START_CHECK"

            answer_status = respond(LinkStatus.OK, STATUS_WORDS,
                                    address(Region.REGISTERS, Reg.STATUS), token=True)
            with m.State("START_CHECK"):
                m.next = "RESPOND"
                with m.If((start_token == 0) | start_token_wide):
                    m.d.sync += respond(LinkStatus.BAD_TOKEN)
                with m.Elif(start_token == run_token):
                    # A retry of the run already started: answer its state.
                    m.d.sync += answer_status
                with m.Elif(self.running):
                    m.d.sync += respond(LinkStatus.BUSY)
                with m.Else():
                    m.d.comb += [bus.valid.eq(1), bus.write.eq(1),
                                 bus.addr.eq(address(Region.REGISTERS, Reg.START_PC)),
                                 bus.wdata.eq(read_address)]
                    m.d.sync += run_token.eq(start_token)
                    m.next = "START"

            with m.State("START"):
                m.d.comb += [bus.valid.eq(1), bus.write.eq(1),
                             bus.addr.eq(address(Region.REGISTERS, Reg.CONTROL)),
                             bus.wdata.eq(Control.START)]
                m.d.sync += answer_status
                m.next = "RESPOND"

            # The count is registered before it is checked: the frame buffer's slow
            # output then feeds only a register.
            with m.State("READ_COUNT"):
                requested_bits = len(requested)
                m.d.sync += [requested.eq(buffer_read.data[0:requested_bits]),
                             requested_too_many.eq(buffer_read.data[requested_bits:16].any()),
                             span.eq(buffer_read.data[0:8] - 1)]
                m.next = "READ_CHECK"

            with m.State("READ_CHECK"):
                with m.If((requested == 0) | (requested > MAX_PAYLOAD_WORDS)
                          | requested_too_many):
                    m.d.sync += respond(LinkStatus.BAD_LENGTH)
                    m.next = "RESPOND"
                with m.Else():
                    m.next = "RANGE"

            # A READ or WRITE of words offset … offset + span must stay inside its region,
            # 2**k words. With span < 256 only the low byte needs adding: the words stay
            # inside if offset < 2**k and, for k <= 8, offset[0:8] + span < 2**k; for
            # k > 8, unless that sum carries into offset[8:k] when those bits are all ones.
            # A region of any other size compares the whole offset + span with it.
            # The sum is registered in one cycle and checked in the next; the write's
            # first word stays on the buffer's output meanwhile.
            with m.State("RANGE"):
                m.d.comb += buffer_read.addr.eq(1)
                m.d.sync += low_sum.eq(read_address[0:8] + span)
                if uneven:
                    m.d.sync += full_sum.eq(read_address[0:REGION_SHIFT] + span)
                m.next = "RANGE_CHECK"

            with m.State("RANGE_CHECK"):
                m.d.comb += buffer_read.addr.eq(1)
                region = read_address[REGION_SHIFT:]
                offset = read_address[0:REGION_SHIFT]

                widest = max((words - 1).bit_length() for words in self._region_words.values())
                above_every_region = offset[widest:] == 0

                def fits(words):
                    if words & (words - 1):   # the last word, offset + span, below words
                        return full_sum < words
                    k = words.bit_length() - 1
                    below = above_every_region & (offset[k:widest] == 0)
                    if k <= 8:
                        return below & (low_sum >> k == 0)
                    return below & ~(low_sum[8] & offset[8:k].all())

                inside = Cat(*[(region == number) & fits(words)
                               for number, words in self._region_words.items()]).any()
                with m.If(~inside):
                    m.d.sync += [*count_error("bad_address"), respond(LinkStatus.BAD_ADDRESS)]
                    m.next = "RESPOND"
                with m.Elif(command == Command.WRITE):
                    m.next = "WRITE"
                with m.Else():
                    m.d.sync += respond(LinkStatus.OK, requested)
                    m.next = "RESPOND"

            with m.State("WRITE"):
                # buffer_read.data holds payload word count + 1 (addressed last cycle).
                m.d.comb += [bus.valid.eq(1), bus.write.eq(1),
                             bus.addr.eq(read_address),
                             bus.wdata.eq(buffer_read.data),
                             buffer_read.addr.eq(count + 2)]
                m.d.sync += [count.eq(count + 1), next_offset]
                with m.If(count == last_write):
                    m.d.sync += respond(LinkStatus.OK)
                    m.next = "RESPOND"

            # -- Respond -------------------------------------------------------------------------
            tx = self.tx
            with m.State("RESPOND"):
                m.d.comb += header.eq(Cat(Const(RESPONSE_SYNC, 8), command, seq, status,
                                          (response_words << 2)[0:16]))
                m.d.comb += [tx.valid.eq(1), tx.payload.eq(header.word_select(header_index, 8))]
                with m.If(tx.ready):
                    with m.If(header_index != 0):
                        m.d.comb += crc_byte.eq(tx.payload)
                        m.d.sync += crc.eq(crc_next)
                    m.d.sync += header_index.eq(header_index + 1)
                    with m.If(header_index == RESPONSE_HEADER_BYTES - 1):
                        with m.If(response_words == 0):
                            m.d.sync += crc_high.eq(0)
                            m.next = "SEND_CRC"
                        with m.Else():
                            m.next = "FETCH"

            with m.State("FETCH"):
                with m.If(~from_counters):
                    m.d.comb += [bus.valid.eq(1), bus.addr.eq(read_address)]
                m.next = "CAPTURE"

            with m.State("CAPTURE"):
                # The NPU answers with rvalid (HOST_READ_LATENCY cycles after the request).
                m.d.sync += byte_index.eq(0)
                with m.If(from_counters):
                    m.d.sync += word.eq(counter_array[count])
                    m.next = "SEND_WORD"
                with m.Elif(self.bus.rvalid):
                    m.d.sync += word.eq(Mux(with_token & (response_words == 1), run_token,
                                            bus.rdata))
                    m.next = "SEND_WORD"

            with m.State("SEND_WORD"):
                m.d.comb += [tx.valid.eq(1), tx.payload.eq(word.word_select(byte_index, 8))]
                with m.If(tx.ready):
                    m.d.comb += crc_byte.eq(tx.payload)
                    m.d.sync += [crc.eq(crc_next), byte_index.eq(byte_index + 1)]
                    with m.If(byte_index == 3):
                        m.d.sync += [count.eq(count + 1), next_offset,
                                     response_words.eq(response_words - 1)]
                        with m.If(response_words == 1):
                            m.d.sync += crc_high.eq(0)
                            m.next = "SEND_CRC"
                        with m.Else():
                            m.next = "FETCH"

            with m.State("SEND_CRC"):
                m.d.comb += [tx.valid.eq(1),
                             tx.payload.eq(crc.word_select(crc_high, 8))]
                with m.If(tx.ready):
                    m.d.sync += crc_high.eq(1)
                    with m.If(crc_high):
                        m.next = "HUNT"
        return m
