"""The host-link protocol engine: UART byte frames ⇄ the NPU's host port.

Frames are defined in :mod:`npugen.protocol`. A request's payload is buffered and its
CRC checked before anything is executed, so a corrupted WRITE never touches a memory.
Line noise, bad CRCs, oversize lengths and truncated frames (no byte for
``timeout_cycles``) are dropped and counted; the engine then hunts for the next sync byte,
so the next valid frame always works. An unknown command is counted and answered with
UNKNOWN_COMMAND. A READ or WRITE that reaches past a region is
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
    error was counted (for a status LED). Without ``error_counters`` (``NpuConfig.
    link_error_counters``) only that flag is kept, and LINK_STATUS answers with no words.
    """

    rx: In(stream.Signature(8))
    tx: Out(stream.Signature(8))
    bus: Out(HostBus())
    running: In(1)
    framing_error: In(1)
    error: Out(1)

    def __init__(self, *, identity_words: int, timeout_cycles: int,
                 region_words: dict[int, int], error_counters: bool = True):
        if timeout_cycles < 16:
            raise ValueError(f"timeout_cycles must be at least 16, not {timeout_cycles!r}")
        for region, words in region_words.items():
            if words < 1 or words > 1 << REGION_SHIFT:
                raise ValueError(f"region {int(region)} must span 1 to 2**{REGION_SHIFT} "
                                 f"words, not {words!r}")
        self._identity_words = identity_words
        self._timeout = timeout_cycles
        self._region_words = {int(region): words for region, words in region_words.items()}
        self._error_counters = error_counters
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        engine = _Engine(m, self, identity_words=self._identity_words, timeout=self._timeout,
                         region_words=self._region_words, error_counters=self._error_counters)
        with m.FSM():
            engine.receive()
            engine.execute()
            engine.start()
            engine.check_range()
            engine.send()
        return m


class _Engine:
    """One elaboration of :class:`LinkEngine`: the registers its FSM's states share, and
    those states in groups, each added by a method to the FSM open in ``m``."""

    def __init__(self, m: Module, link: LinkEngine, *, identity_words: int, timeout: int,
                 region_words: dict[int, int], error_counters: bool):
        self.m = m
        self.link = link   # the component's ports
        self.identity_words = identity_words
        self.timeout = timeout
        self.region_words = region_words
        m.submodules.buffer = self.buffer = Memory(shape=32, depth=MAX_PAYLOAD_WORDS + 1,
                                                   init=[])
        self.buffer_write = self.buffer.write_port()
        self.buffer_read = self.buffer.read_port()

        self.counters = ({name: Signal(LINK_COUNTER_BITS, name=f"link_{name}")
                          for name in LINK_COUNTERS} if error_counters else {})
        self.counter_array = Array(self.counters.values())
        # Set with any error count, cleared with them by RESET (a flag, not a wide OR).
        self.error = Signal()
        m.d.comb += self.link.error.eq(self.error)
        with m.If(self.link.framing_error):
            m.d.sync += self.count_error("framing_errors")

        self.command = Signal(8)
        # Decoded as the bytes arrive, so that EXECUTE decides from flip-flops: the
        # command's low four bits if it is known, else 0 (no command), and the lengths
        # it checks.
        self.command_code = Signal(4)
        self.length_is = {name: Signal(name=f"length_is_{name}")
                          for name in ("zero", "write_address", "write_words", "read", "start")}
        self.seq = Signal(8)
        # As narrow as a frame that is not oversize needs.
        self.length = Signal(range(MAX_PAYLOAD_BYTES + 1))
        # Precomputed when the length arrives, so no subtraction sits in a compare's path.
        self.last_byte = Signal.like(self.length)   # length - 1
        self.last_write = Signal(8)            # words to write - 1
        # It is (length >> 2) less this: the address's words and one.
        self.write_words_less = WRITE_ADDRESS_BYTES // 4 + 1
        self.count = Signal.like(self.length)       # payload bytes received, or words handled
        self.word = Signal(32)
        self.crc = Signal(16)
        # One CRC step for the frame received and the response sent (never both at once),
        # a cycle after its byte: a state that takes or sends a byte registers it in
        # `crc_byte` and sets `crc_step`, so neither the byte's choice nor the handshake
        # lies on the path into the CRC. A UART byte lasts many cycles, so the CRC is
        # up to date before a state compares or sends it (SEND_CRC waits for the step).
        # It starts over with a request's sync byte and after a request's CRC (CRC1);
        # these come later in the module, so they win over a step still pending.
        self.crc_byte = Signal(8, reset_less=True)
        self.crc_step = Signal()
        m.d.sync += self.crc_step.eq(0)
        with m.If(self.crc_step):
            m.d.sync += self.crc.eq(crc16_step(self.crc, self.crc_byte))
        self.crc_received = Signal(16)
        # Cycles without a byte in a frame; `timed_out` is registered a cycle ahead of
        # `idle == timeout`, so that no wide compare feeds the FSM's decisions.
        self.idle = Signal(range(self.timeout + 1))
        self.timed_out = Signal()
        # The token of the last run started (0: none since reset).
        self.run_token = Signal(RUN_TOKEN_BITS)
        self.start_token = Signal(RUN_TOKEN_BITS)
        self.start_token_wide = Signal()   # bits set above RUN_TOKEN_BITS
        # A READ or WRITE moves words offset … offset + span (span < 256).
        self.span = Signal(8)
        self.low_sum = Signal(9)           # offset[0:8] + span
        self.inside = Signal()             # the words are inside their region
        # offset + span, for the regions whose span is not a power of two.
        self.uneven = any(words & (words - 1) for words in self.region_words.values())
        self.full_sum = Signal(REGION_SHIFT + 1)
        self.requested = Signal(range(MAX_PAYLOAD_WORDS + 1))
        self.requested_too_many = Signal()     # count bits above those of `requested` set

        self.status = Signal(8)
        # Payload words of the response still to send: the header gives it in full, then
        # each word sent counts it down (an equality against 1 ends the payload: no
        # subtraction on that path).
        self.response_words = Signal(range(MAX_PAYLOAD_WORDS + 1))
        self.read_address = Signal(32)
        self.from_counters = Signal()
        self.with_token = Signal()      # the answer's last word is the run token (STATUS, START)
        self.header = Signal(RESPONSE_HEADER_BYTES * 8)
        self.header_index = Signal(range(RESPONSE_HEADER_BYTES))
        self.byte_index = Signal(2)
        self.crc_high = Signal()

        # The next word's address: the range check keeps it inside the region.
        offset = self.read_address[0:REGION_SHIFT]
        self.next_offset = offset.eq(offset + 1)
        self.rx = self.link.rx
        self.byte = self.rx.payload
        # `rx.ready` is high in the states that take bytes (HUNT and the frame's), kept in
        # a register: the FSM leaves them only from CRC1 to EXECUTE and comes back only
        # from SEND_CRC to HUNT. There a byte is taken with `rx.valid` alone, and neither
        # the FSM's decisions nor the receive FIFO wait for the state's decode.
        self.receiving = Signal(init=1)
        m.d.comb += self.rx.ready.eq(self.receiving)
        self.taken = self.rx.valid
        # Requests leave through registers: the frame buffer's slow output drives no path
        # into the NPU. A read's answer is taken when rvalid comes (CAPTURE).
        self.request = request = HostBus().flip().create(path=("request",))
        bus = link.bus
        m.d.sync += [bus.valid.eq(request.valid), bus.write.eq(request.write),
                     bus.addr.eq(request.addr), bus.wdata.eq(request.wdata)]
        m.d.comb += [request.write.eq(0), request.rdata.eq(bus.rdata)]

    def count_error(self, name):
        counted = [self.counters[name].eq(self.counters[name] + 1)] if self.counters else []
        return [*counted, self.error.eq(1)]

    def respond(self, result, words=0, source=None, counters_source=False, token=False):
        """Begin a response: status, payload length in words, where words come from."""
        statements = [self.status.eq(result), self.response_words.eq(words), self.count.eq(0),
                      self.from_counters.eq(counters_source), self.with_token.eq(token),
                      self.header_index.eq(0)]
        if source is not None:
            statements.append(self.read_address.eq(source))
        return statements

    def receive(self) -> None:
        """HUNT for the sync byte, then take the frame into the buffer and check its CRC."""
        m = self.m
        with m.State("HUNT"):
            with m.If(self.taken):
                with m.If(self.byte == REQUEST_SYNC):
                    m.d.sync += [self.crc.eq(CRC_INITIAL), self.idle.eq(0),
                                 self.timed_out.eq(0)]
                    m.next = "COMMAND"
                with m.Else():
                    m.d.sync += self.count_error("noise_bytes")

        receiving = ("COMMAND", "SEQ", "LENGTH0", "LENGTH1", "PAYLOAD", "CRC0", "CRC1")
        for state in receiving:
            with m.State(state):
                with m.If(self.taken):
                    m.d.sync += [self.idle.eq(0), self.timed_out.eq(0)]
                    if state not in ("CRC0", "CRC1"):
                        m.d.sync += [self.crc_byte.eq(self.byte), self.crc_step.eq(1)]
                with m.Elif(self.timed_out):
                    m.d.sync += self.count_error("truncated")
                    m.next = "HUNT"
                with m.Else():
                    m.d.sync += [self.idle.eq(self.idle + 1),
                                 self.timed_out.eq(self.idle == self.timeout - 1)]
                with m.If(self.taken):
                    if state == "COMMAND":
                        known = Cat(*[self.byte == command for command in Command]).any()
                        m.d.sync += [self.command.eq(self.byte),
                                     self.command_code.eq(Mux(known, self.byte[0:4], 0))]
                        m.next = "SEQ"
                    elif state == "SEQ":
                        m.d.sync += self.seq.eq(self.byte)
                        m.next = "LENGTH0"
                    elif state == "LENGTH0":
                        m.d.sync += self.length[0:8].eq(self.byte)
                        m.next = "LENGTH1"
                    elif state == "LENGTH1":
                        full = Cat(self.length[0:8], self.byte)
                        m.d.sync += [self.length.eq(full), self.count.eq(0), self.word.eq(0),
                                     self.last_byte.eq(full - 1),
                                     self.last_write.eq((full >> 2) - self.write_words_less)]
                        flags = self.length_is
                        m.d.sync += [
                            flags["zero"].eq(full == 0),
                            flags["write_address"].eq(full == WRITE_ADDRESS_BYTES),
                            flags["write_words"].eq((full > WRITE_ADDRESS_BYTES)
                                                    & (full[0:2] == 0)),
                            flags["read"].eq(full == READ_PAYLOAD_BYTES),
                            flags["start"].eq(full == START_PAYLOAD_BYTES)]
                        with m.If(full > MAX_PAYLOAD_BYTES):
                            m.d.sync += self.count_error("oversize")
                            m.next = "HUNT"
                        with m.Elif(full == 0):
                            m.next = "CRC0"
                        with m.Else():
                            m.next = "PAYLOAD"
                    elif state == "PAYLOAD":
                        lane = self.count[0:2]
                        new_word = Signal(32)
                        m.d.comb += new_word.eq(self.word)
                        with m.Switch(lane):
                            for k in range(4):
                                with m.Case(k):
                                    m.d.comb += new_word[8 * k:8 * k + 8].eq(self.byte)
                        last = self.count == self.last_byte
                        m.d.comb += [self.buffer_write.addr.eq(self.count >> 2),
                                     self.buffer_write.data.eq(new_word),
                                     self.buffer_write.en.eq((lane == 3) | last)]
                        m.d.sync += [self.word.eq(new_word), self.count.eq(self.count + 1)]
                        with m.If(lane == 3):
                            m.d.sync += self.word.eq(0)
                        with m.If(last):
                            m.next = "CRC0"
                    elif state == "CRC0":
                        m.d.sync += self.crc_received[0:8].eq(self.byte)
                        m.next = "CRC1"
                    else:
                        # The response's CRC starts here (nothing steps it before RESPOND).
                        m.d.sync += self.crc.eq(CRC_INITIAL)
                        with m.If(Cat(self.crc_received[0:8], self.byte) == self.crc):
                            m.d.comb += self.buffer_read.addr.eq(0)
                            m.d.sync += self.receiving.eq(0)
                            m.next = "EXECUTE"
                        with m.Else():
                            m.d.sync += self.count_error("bad_crc")
                            m.next = "HUNT"

    def execute(self) -> None:
        """EXECUTE a request whose CRC held (the buffer's word 0 on its read port): answer
        it, or go on to the states it needs."""
        m = self.m
        first = self.buffer_read.data
        length_is = self.length_is
        if max(Command) >= 16 or min(Command) == 0:
            raise ValueError("EXECUTE tells the commands apart by their low four bits")
        with m.State("EXECUTE"):
            m.next = "RESPOND"
            with m.Switch(self.command_code):
                with m.Case(Command.IDENTIFY):
                    with m.If(length_is["zero"]):
                        m.d.sync += self.respond(LinkStatus.OK, self.identity_words,
                                                 address(Region.REGISTERS, Reg.MAGIC))
                    with m.Else():
                        m.d.sync += self.respond(LinkStatus.BAD_LENGTH)
                with m.Case(Command.WRITE):
                    # An address and no words: nothing to do.
                    with m.If(length_is["write_address"]):
                        m.d.sync += self.respond(LinkStatus.OK)
                    with m.Elif(length_is["write_words"]):
                        m.d.sync += [self.read_address.eq(first), self.count.eq(0),
                                     self.span.eq(self.last_write)]
                        m.d.comb += self.buffer_read.addr.eq(1)
                        m.next = "RANGE"
                    with m.Else():
                        m.d.sync += self.respond(LinkStatus.BAD_LENGTH)
                with m.Case(Command.READ):
                    with m.If(length_is["read"]):
                        m.d.comb += self.buffer_read.addr.eq(1)
                        m.d.sync += self.read_address.eq(first)
                        m.next = "READ_COUNT"
                    with m.Else():
                        m.d.sync += self.respond(LinkStatus.BAD_LENGTH)
                with m.Case(Command.START):
                    with m.If(length_is["start"]):
                        m.d.comb += self.buffer_read.addr.eq(1)
                        m.d.sync += self.read_address.eq(first)   # the pc
                        m.next = "START_TOKEN"
                    with m.Else():
                        m.d.sync += self.respond(LinkStatus.BAD_LENGTH)
                with m.Case(Command.STATUS):
                    m.d.sync += self.respond(LinkStatus.OK, STATUS_WORDS,
                                             address(Region.REGISTERS, Reg.STATUS), token=True)
                with m.Case(Command.COUNTERS):
                    m.d.sync += self.respond(LinkStatus.OK, COUNTERS_WORDS,
                                             address(Region.REGISTERS, Reg.COUNTERS))
                with m.Case(Command.RESET):
                    m.d.comb += [self.request.valid.eq(1), self.request.write.eq(1),
                                 self.request.addr.eq(address(Region.REGISTERS, Reg.CONTROL)),
                                 self.request.wdata.eq(Control.ABORT)]
                    m.d.sync += [counter.eq(0) for counter in self.counters.values()]
                    m.d.sync += self.error.eq(0)
                    m.d.sync += [self.respond(LinkStatus.OK), self.run_token.eq(0)]
                with m.Case(Command.LINK_STATUS):
                    m.d.sync += self.respond(LinkStatus.OK, len(self.counters), 0, True)
                with m.Default():
                    m.d.sync += [*self.count_error("unknown_command"),
                                 self.respond(LinkStatus.UNKNOWN_COMMAND)]

    def start(self) -> None:
        """START: check the run token, then start the NPU unless it is a retry or busy."""
        m = self.m
        # The token is registered before it is compared: the frame buffer's slow output
        # then feeds only a register.
        with m.State("START_TOKEN"):
            m.d.sync += [self.start_token.eq(self.buffer_read.data[0:RUN_TOKEN_BITS]),
                         self.start_token_wide.eq(self.buffer_read.data[RUN_TOKEN_BITS:].any())]
            m.next = "START_COMPARE"

        # The token's compares are registered too: the decision then starts from flags.
        token_bad, token_retry = Signal(), Signal()
        with m.State("START_COMPARE"):
            m.d.sync += [token_bad.eq((self.start_token == 0) | self.start_token_wide),
                         token_retry.eq(self.start_token == self.run_token)]
            m.next = "START_CHECK"

        answer_status = self.respond(LinkStatus.OK, STATUS_WORDS,
                                     address(Region.REGISTERS, Reg.STATUS), token=True)
        with m.State("START_CHECK"):
            m.next = "RESPOND"
            with m.If(token_bad):
                m.d.sync += self.respond(LinkStatus.BAD_TOKEN)
            with m.Elif(token_retry):
                # A retry of the run already started: answer its state.
                m.d.sync += answer_status
            with m.Elif(self.link.running):
                m.d.sync += self.respond(LinkStatus.BUSY)
            with m.Else():
                m.d.comb += [self.request.valid.eq(1), self.request.write.eq(1),
                             self.request.addr.eq(address(Region.REGISTERS, Reg.START_PC)),
                             self.request.wdata.eq(self.read_address)]
                m.d.sync += self.run_token.eq(self.start_token)
                m.next = "START"

        with m.State("START"):
            m.d.comb += [self.request.valid.eq(1), self.request.write.eq(1),
                         self.request.addr.eq(address(Region.REGISTERS, Reg.CONTROL)),
                         self.request.wdata.eq(Control.START)]
            m.d.sync += answer_status
            m.next = "RESPOND"

    def check_range(self) -> None:
        """READ's count, then the range check of a READ or WRITE, then WRITE's words."""
        m = self.m
        # The count is registered before it is checked: the frame buffer's slow output
        # then feeds only a register.
        with m.State("READ_COUNT"):
            data = self.buffer_read.data
            requested_bits = len(self.requested)
            m.d.sync += [self.requested.eq(data[0:requested_bits]),
                         self.requested_too_many.eq(data[requested_bits:16].any()),
                         self.span.eq(data[0:8] - 1)]
            m.next = "READ_CHECK"

        with m.State("READ_CHECK"):
            with m.If((self.requested == 0) | (self.requested > MAX_PAYLOAD_WORDS)
                      | self.requested_too_many):
                m.d.sync += self.respond(LinkStatus.BAD_LENGTH)
                m.next = "RESPOND"
            with m.Else():
                m.next = "RANGE"

        # A READ or WRITE of words offset … offset + span must stay inside its region,
        # 2**k words. With span < 256 only the low byte needs adding: the words stay
        # inside if offset < 2**k and, for k <= 8, offset[0:8] + span < 2**k; for
        # k > 8, unless that sum carries into offset[8:k] when those bits are all ones.
        # A region of any other size compares the whole offset + span with it.
        # The sum is registered in one cycle, checked in the next and acted on in the
        # third (the check's compares stay off the paths into the response's
        # registers); the write's first word stays on the buffer's output meanwhile.
        with m.State("RANGE"):
            m.d.comb += self.buffer_read.addr.eq(1)
            m.d.sync += self.low_sum.eq(self.read_address[0:8] + self.span)
            if self.uneven:
                m.d.sync += self.full_sum.eq(self.read_address[0:REGION_SHIFT] + self.span)
            m.next = "RANGE_CHECK"

        with m.State("RANGE_CHECK"):
            m.d.comb += self.buffer_read.addr.eq(1)
            region = self.read_address[REGION_SHIFT:]
            offset = self.read_address[0:REGION_SHIFT]

            widest = max((words - 1).bit_length() for words in self.region_words.values())
            above_every_region = offset[widest:] == 0

            def fits(words):
                if words & (words - 1):   # the last word, offset + span, below words
                    return self.full_sum < words
                k = words.bit_length() - 1
                below = above_every_region & (offset[k:widest] == 0)
                if k <= 8:
                    return below & (self.low_sum >> k == 0)
                return below & ~(self.low_sum[8] & offset[8:k].all())

            m.d.sync += self.inside.eq(Cat(*[(region == number) & fits(words)
                                             for number, words in self.region_words.items()]
                                           ).any())
            m.next = "RANGE_DECIDE"

        with m.State("RANGE_DECIDE"):
            m.d.comb += self.buffer_read.addr.eq(1)
            with m.If(~self.inside):
                m.d.sync += [*self.count_error("bad_address"),
                             self.respond(LinkStatus.BAD_ADDRESS)]
                m.next = "RESPOND"
            with m.Elif(self.command_code == Command.WRITE):
                m.next = "WRITE"
            with m.Else():
                m.d.sync += self.respond(LinkStatus.OK, self.requested)
                m.next = "RESPOND"

        with m.State("WRITE"):
            # buffer_read.data holds payload word count + 1 (addressed last cycle).
            m.d.comb += [self.request.valid.eq(1), self.request.write.eq(1),
                         self.request.addr.eq(self.read_address),
                         self.request.wdata.eq(self.buffer_read.data),
                         self.buffer_read.addr.eq(self.count + 2)]
            m.d.sync += [self.count.eq(self.count + 1), self.next_offset]
            with m.If(self.count == self.last_write):
                m.d.sync += self.respond(LinkStatus.OK)
                m.next = "RESPOND"

    def send(self) -> None:
        """The response: header, payload words (from the NPU or the link's counters), CRC."""
        m = self.m
        tx = self.link.tx
        with m.State("RESPOND"):
            m.d.comb += self.header.eq(Cat(Const(RESPONSE_SYNC, 8), self.command, self.seq,
                                           self.status, (self.response_words << 2)[0:16]))
            m.d.comb += [tx.valid.eq(1),
                         tx.payload.eq(self.header.word_select(self.header_index, 8))]
            with m.If(tx.ready):
                with m.If(self.header_index != 0):
                    m.d.sync += [self.crc_byte.eq(tx.payload), self.crc_step.eq(1)]
                m.d.sync += self.header_index.eq(self.header_index + 1)
                with m.If(self.header_index == RESPONSE_HEADER_BYTES - 1):
                    with m.If(self.response_words == 0):
                        m.d.sync += self.crc_high.eq(0)
                        m.next = "SEND_CRC"
                    with m.Else():
                        m.next = "FETCH"

        with m.State("FETCH"):
            with m.If(~self.from_counters):
                m.d.comb += [self.request.valid.eq(1), self.request.addr.eq(self.read_address)]
            m.next = "CAPTURE"

        with m.State("CAPTURE"):
            # The NPU answers with rvalid (HOST_READ_LATENCY cycles after the request).
            m.d.sync += self.byte_index.eq(0)
            # Without error counters LINK_STATUS answers no words: none is fetched here.
            with m.If(self.from_counters if self.counters else Const(0, 1)):
                if self.counters:
                    m.d.sync += self.word.eq(self.counter_array[self.count])
                m.next = "SEND_WORD"
            with m.Elif(self.link.bus.rvalid):
                token_word = self.with_token & (self.response_words == 1)
                m.d.sync += self.word.eq(Mux(token_word, self.run_token, self.request.rdata))
                m.next = "SEND_WORD"

        with m.State("SEND_WORD"):
            m.d.comb += [tx.valid.eq(1), tx.payload.eq(self.word.word_select(self.byte_index, 8))]
            with m.If(tx.ready):
                m.d.sync += [self.crc_byte.eq(tx.payload), self.crc_step.eq(1),
                             self.byte_index.eq(self.byte_index + 1)]
                with m.If(self.byte_index == 3):
                    m.d.sync += [self.count.eq(self.count + 1), self.next_offset,
                                 self.response_words.eq(self.response_words - 1)]
                    with m.If(self.response_words == 1):
                        m.d.sync += self.crc_high.eq(0)
                        m.next = "SEND_CRC"
                    with m.Else():
                        m.next = "FETCH"

        with m.State("SEND_CRC"):
            m.d.comb += [tx.valid.eq(~self.crc_step),
                         tx.payload.eq(self.crc.word_select(self.crc_high, 8))]
            with m.If(tx.ready & ~self.crc_step):
                m.d.sync += self.crc_high.eq(1)
                with m.If(self.crc_high):
                    m.d.sync += self.receiving.eq(1)
                    m.next = "HUNT"
