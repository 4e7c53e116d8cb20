"""The host driver: one ``Device`` for a board's serial port, a virtual board's TCP
socket, or ``"sim"`` (which starts its own virtual board).

    with Device.open("socket://127.0.0.1:5555") as npu:
        npu.identify()
        npu.load(program)
        result = npugen.run(program, x, target=npu)

A ``Device`` is a :class:`~npugen.target.Target`: it loads a program and runs jobs;
:func:`npugen.run` turns a program's inputs into jobs and their results into outputs.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections import deque

import numpy as np

from .config import NpuConfig
from .golden import Counters
from .hostops import NpuRunError
from .job import Job, JobResult, counters_from_words
from .memory_map import Control, Reg, Region, Status, address, config_from_identity, memories
from .program import Program
from .protocol import (
    LINK_COUNTERS,
    MAX_PAYLOAD_WORDS,
    READ_FORMAT,
    RUN_TOKEN_BITS,
    START_FORMAT,
    STATUS_ANSWER,
    STATUS_WORDS,
    WRITE_ADDRESS_FORMAT,
    Command,
    LinkStatus,
    Response,
    ResponseParser,
    crc16,
    encode_request,
)
from .target import ConfigMismatch, Target, check_config, check_job

__all__ = ["Device", "DeviceError", "DeviceLost"]

DEFAULT_BAUD = 115200

#: What each refusal means, for the error message.
REFUSALS = {
    LinkStatus.UNKNOWN_COMMAND: "the device does not know this command (an older bitstream?)",
    LinkStatus.BAD_LENGTH: "the payload length does not fit the command (a bitstream of "
                           "another npugen version?)",
    LinkStatus.BAD_ADDRESS: "the addresses reach past the memory or the registers",
    LinkStatus.BUSY: "a run is on",
    LinkStatus.BAD_TOKEN: "the run token is 0 or too wide",
}


class DeviceError(RuntimeError):
    """The device cannot be used: it cannot be opened, refused a request, or is not the
    NPU expected (bad input: exit status 2 on the command line)."""


class DeviceLost(DeviceError):
    """The device stopped answering, closed the connection, or lost the run (a lost
    board: exit status 1 on the command line)."""


class Device(Target):
    """An NPU behind the host link, a :class:`~npugen.target.Target`. Use :meth:`open`."""

    def __init__(self, port, url: str, *, timeout: float, retries: int,
                 server: subprocess.Popen | None = None) -> None:
        self._port = port
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self._server = server
        self._parser = ResponseParser()
        self._early: dict[int, Response] = {}  # answers parsed, not yet claimed
        self._seq = 0
        self._config: NpuConfig | None = None
        # The device's run token as last seen; None until the session synchronizes.
        self._run_token: int | None = None
        self.retried = 0  # requests sent again after a lost or corrupt answer
        self.loaded: Program | None = None  # the program load() put on the device

    # -- opening and closing ---------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, baud: int = DEFAULT_BAUD, timeout: float = 5.0,
             retries: int = 3, config: NpuConfig | None = None,
             simulator: str = "verilator") -> Device:
        """Open ``url``: a serial device (``/dev/ttyUSB1``), ``socket://HOST:PORT``, or
        ``"sim"`` (starts ``npugen serve-sim`` for ``config`` on ``simulator`` and stops it
        on close)."""
        import serial

        server = None
        if url == "sim":
            server, url = _start_virtual_board(config or NpuConfig(), simulator)
        try:
            port = serial.serial_for_url(url, baudrate=baud, timeout=0.05)
            port.reset_input_buffer()   # nothing a previous session left is an answer
        except (serial.SerialException, ValueError, OSError) as error:
            if server is not None:
                _stop(server)
            raise DeviceError(f"cannot open {url!r}: {error}") from None
        device = cls(port, url, timeout=timeout, retries=retries, server=server)
        return device

    def close(self) -> None:
        try:
            self._port.close()
        finally:
            if self._server is not None:
                _stop(self._server)
                self._server = None

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFF
        return self._seq

    def _lost(self, error: Exception) -> DeviceLost:
        return DeviceLost(f"lost the connection to {self.url} ({error}): the board was "
                          f"unplugged or the virtual board stopped; nothing more was read")

    def _send(self, frame: bytes) -> None:
        try:
            self._port.write(frame)
        except Exception as error:   # pyserial raises SerialException, sockets OSError
            raise self._lost(error) from None

    def _receive(self, seq: int, command: Command) -> Response | None:
        """The answer to request ``seq``, or None after ``timeout`` seconds."""
        deadline = time.monotonic() + self.timeout
        while seq not in self._early:
            if time.monotonic() > deadline:
                return None
            try:
                data = self._port.read(4096)
            except Exception as error:
                raise self._lost(error) from None
            # One read may hold several answers: keep them all.
            for response in self._parser.feed(data):
                if response.command == 0 and response.status is LinkStatus.BUSY:
                    raise DeviceError(f"{self.url} is busy: another client holds the virtual "
                                      f"board; try again when it has finished")
                if response.command == int(command):
                    self._early[response.seq] = response
        response = self._early.pop(seq)
        if response.status is not LinkStatus.OK:
            status = response.status
            if isinstance(status, LinkStatus):
                reason = f"{status.name} ({REFUSALS[status]})"
            else:
                reason = (f"status {status}, which this host does not know (a bitstream of "
                          f"a newer npugen version?)")
            raise DeviceError(f"{command.name} refused by {self.url}: {reason}")
        return response

    def _transact(self, command: Command, seq: int, frame: bytes,
                  first_try_sent: bool = False) -> Response:
        for attempt in range(self.retries + 1):
            if attempt or not first_try_sent:
                if attempt:
                    self.retried += 1
                self._send(frame)
            response = self._receive(seq, command)
            if response is not None:
                return response
        raise DeviceLost(f"no answer to {command.name} from {self.url} after "
                         f"{self.retries + 1} tries of {self.timeout:g} s; is it an npugen "
                         f"NPU, powered, and at this baud rate?")

    def request(self, command: Command, payload: bytes = b"") -> Response:
        """Send a request and return its answer; resend on timeout or a corrupt answer."""
        self._early.clear()
        seq = self._next_seq()
        return self._transact(command, seq, encode_request(command, seq, payload))

    def requests(self, command: Command, payloads: list[bytes],
                 window: int = 2) -> list[Response]:
        """Send requests with up to ``window`` in flight (the device buffers one whole
        request while it executes another), for idempotent commands such as WRITE."""
        self._early.clear()
        in_flight: deque[tuple[int, bytes]] = deque()
        answers = []
        for payload in payloads:
            seq = self._next_seq()
            frame = encode_request(command, seq, payload)
            self._send(frame)
            in_flight.append((seq, frame))
            if len(in_flight) >= window:
                answers.append(self._transact(command, *in_flight.popleft(), True))
        while in_flight:
            answers.append(self._transact(command, *in_flight.popleft(), True))
        return answers

    def identify(self) -> NpuConfig:
        """The device's configuration, from its identity block."""
        words = self.request(Command.IDENTIFY).words()
        try:
            self._config = config_from_identity(words)
        except ValueError as error:
            raise DeviceError(f"{self.url}: {error}") from None
        return self._config

    @property
    def config(self) -> NpuConfig:
        return self._config or self.identify()

    def write(self, address: int, words: np.ndarray | list[int]) -> None:
        """Write words to consecutive host addresses, two frames in flight."""
        words = np.asarray(words, dtype=np.uint32)
        self.requests(Command.WRITE, [
            struct.pack(WRITE_ADDRESS_FORMAT, address + start)
            + words[start:start + MAX_PAYLOAD_WORDS].astype("<u4").tobytes()
            for start in range(0, len(words), MAX_PAYLOAD_WORDS)])

    def read(self, address: int, count: int) -> list[int]:
        out: list[int] = []
        for start in range(0, count, MAX_PAYLOAD_WORDS):
            n = min(MAX_PAYLOAD_WORDS, count - start)
            out += self.request(Command.READ, struct.pack(READ_FORMAT, address + start, n)).words()
        return out

    def uptime(self) -> int:
        """Clock cycles since the device's reset (its free-running UPTIME register)."""
        low, high = self.read(address(Region.REGISTERS, Reg.UPTIME), 2)
        return low | high << 32

    def status(self) -> Status:
        return self.run_state()[0]

    def run_state(self) -> tuple[Status, int]:
        """STATUS and the token of the device's current (or last) run; 0: none since
        its reset."""
        words = self.request(Command.STATUS).words()
        if len(words) != STATUS_WORDS:
            raise DeviceError(f"{self.url} answers STATUS with {len(words)} words, not "
                              f"{STATUS_WORDS}: its bitstream speaks an older protocol; "
                              f"rebuild it (npugen build) or restart serve-sim")
        return (Status(words[STATUS_ANSWER.index("STATUS")]),
                words[STATUS_ANSWER.index("RUN_TOKEN")])

    def counters(self) -> Counters:
        return counters_from_words(self.request(Command.COUNTERS).words(), self.config)

    def link_status(self) -> dict[str, int]:
        """The link's error counters by name; empty for a device generated without them
        (``link_error_counters``), whose LINK_STATUS answers no words."""
        words = self.request(Command.LINK_STATUS).words()
        names = LINK_COUNTERS if self.config.link_error_counters else ()
        if len(words) != len(names):
            raise DeviceError(f"{self.url} answers LINK_STATUS with {len(words)} words, not "
                              f"{len(names)}: its bitstream is not the one it identifies as; "
                              f"rebuild it (npugen build)")
        return dict(zip(names, words, strict=True))

    def reset(self) -> None:
        """Abort any run and clear the link's error counters and run token."""
        self.request(Command.RESET)
        self._run_token = 0

    def _synchronize(self) -> None:
        """Once a session, before its first upload or run: learn the device's run token,
        and abort a run that a host gone before this one left on."""
        if self._run_token is not None:
            return
        status, token = self.run_state()
        if Status.RUNNING in status:
            self.write(address(Region.REGISTERS, Reg.CONTROL), [int(Control.ABORT)])
            status, token = self.run_state()
            if Status.RUNNING in status:
                raise DeviceLost(f"{self.url} keeps running after ABORT (status {status!r})")
        self._run_token = token

    def _new_token(self) -> int:
        """A run token the device has not got as its last: the one after it, never 0."""
        self._run_token = self._run_token % ((1 << RUN_TOKEN_BITS) - 1) + 1
        return self._run_token

    def _check_token(self, token: int, seen: int) -> None:
        if seen != token:
            self._run_token = seen
            raise DeviceLost(f"the run on {self.url} was lost: the device reports run token "
                             f"{seen}, this run's is {token} (it was reset, or another host "
                             f"started a run); its outputs were not read")

    # -- programs --------------------------------------------------------------------

    def check_program(self, program: Program) -> None:
        """Raise :class:`DeviceError` if ``program`` was compiled for another NPU than
        this device's."""
        try:
            check_config(program, self.config)
        except ConfigMismatch as error:
            raise DeviceError(f"{self.url}: {error}") from None

    def check_job(self, job: Job) -> None:
        """Raise :class:`DeviceError` if ``job`` was made for another NPU than this
        device's."""
        try:
            check_job(job, self.config)
        except ConfigMismatch as error:
            raise DeviceError(f"{self.url}: {error}") from None

    def _write_job(self, job: Job, verify: bool) -> None:
        addresses, words = job.host_writes()
        runs = np.split(np.arange(len(addresses)), np.where(np.diff(addresses) != 1)[0] + 1)
        for run in runs:
            if len(run) == 0:
                continue
            first = int(addresses[run[0]])
            self.write(first, words[run])
            if verify:
                back = np.array(self.read(first, len(run)), dtype=np.uint32)
                sent = words[run].astype("<u4").tobytes()
                if crc16(back.astype("<u4").tobytes()) != crc16(sent):
                    raise DeviceError(f"upload to {self.url} failed verification at address "
                                      f"{first:#010x} (CRC of the read-back differs)")

    def load(self, program: Program, *, verify: bool = True) -> None:
        """Upload instructions, weights and parameters; read back and compare CRCs."""
        self.check_program(program)
        self._synchronize()
        job = Job(program.config)
        for region, entry, values in program.segments:
            job.write(region, entry, values)
        self.loaded = None   # until the image is on the device
        self._write_job(job, verify)
        self.loaded = program

    def execute(self, job: Job, *, poll_seconds: float = 0.002,
                timeout: float = 600.0) -> JobResult:
        """Load ``job``'s writes, run from its start address, read its results back.
        Raises :class:`DeviceError` if the job was made for another NPU than this
        device's."""
        from .hostops import decode_result

        self.check_job(job)
        self._synchronize()
        if job.follows:
            # It reads what the run before it left: that run must be the device's last.
            _, seen = self.run_state()
            if seen != self._run_token:
                raise DeviceLost(f"another run (token {seen}) came between two stages of "
                                 f"this program's run on {self.url} (token "
                                 f"{self._run_token}), or the device was reset: the stage "
                                 f"would read its activations; the run was discarded")
        self._write_job(job, verify=False)
        token = self._new_token()
        # A START whose answer is lost is resent with the same token: the device does not
        # start that run twice, and answers its state.
        answer = self.request(Command.START, struct.pack(START_FORMAT, job.start_pc, token)).words()
        self._check_token(token, answer[-1])
        deadline = time.monotonic() + timeout
        while True:
            status, seen = self.run_state()
            self._check_token(token, seen)
            if Status.RUNNING not in status:
                break
            if time.monotonic() > deadline:
                self.reset()
                raise DeviceLost(f"the run on {self.url} did not finish in {timeout:g} s; "
                                 f"it was aborted")
            time.sleep(poll_seconds)
        counter_words = self.request(Command.COUNTERS).words()
        words: list[int] = []
        infos = memories(job.config)
        for name, (region, _, count) in job.reads.items():
            stride = infos[Region(region)].stride
            words += self.read(int(job.read_addresses(name)[0]), count * stride)
        # Still this run's state: nothing reset or restarted the NPU while it was read.
        after, seen = self.run_state()
        self._check_token(token, seen)
        if after != status:
            raise DeviceLost(f"the state of the run on {self.url} changed while its outputs "
                             f"were read ({status!r}, then {after!r}); they were discarded")
        try:
            return decode_result(job, int(status), counter_words, words)
        except NpuRunError:
            if Status.ABORTED in status:
                raise DeviceLost(f"the run on {self.url} was aborted (by another host's "
                                 f"RESET?); its outputs were discarded") from None
            raise


def _start_virtual_board(config: NpuConfig, simulator: str) -> tuple[subprocess.Popen, str]:
    flags = ["--sim", simulator]
    for name, value in config.to_dict().items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    command = [sys.executable, "-m", "npugen", "serve-sim", "--port", "0", *flags]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=os.environ.copy())
    line = server.stdout.readline().strip()
    if not line.startswith("listening on "):
        _stop(server)
        detail = server.stderr.read()[-2000:] if server.stderr else ""
        raise DeviceError(f"the virtual board did not start: {line!r}\n{detail}")
    return server, line.removeprefix("listening on ")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

