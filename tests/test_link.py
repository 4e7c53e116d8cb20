"""The protocol engine with an NPU behind it, in Amaranth's simulator: every command,
and recovery from noise, bad CRCs, oversize lengths, truncated frames, unknown commands."""

import struct

import numpy as np
import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from npugen.config import NpuConfig
from npugen.hw.link import LinkEngine
from npugen.hw.npu import Npu
from npugen.job import run_golden
from npugen.matmul import matmul_job, matmul_output
from npugen.memory_map import COUNTER_NAMES, Region, Status, address, identity_words, region_words
from npugen.protocol import (
    LINK_COUNTERS,
    RUN_TOKEN_BITS,
    Command,
    LinkStatus,
    ResponseParser,
    encode_request,
)

CONFIG = NpuConfig(rows=2, cols=2, activation_depth=32, weight_depth=32, accumulator_depth=32,
                   instruction_depth=16, param_depth=16)
TIMEOUT = 64


#: Memories whose depths are not powers of two (multiples of DEPTH_STEP).
UNEVEN_CONFIG = NpuConfig(rows=2, cols=2, activation_depth=768, weight_depth=768,
                          accumulator_depth=32, instruction_depth=16, param_depth=16)


def run_session(steps, config=CONFIG):
    """Run ``steps``: a list of ("send", bytes) and ("idle", cycles); return every
    response frame the engine sent, in order, and the parser's dropped-byte count."""
    m = Module()
    m.submodules.npu = npu = Npu(config)
    m.submodules.link = link = LinkEngine(identity_words=len(identity_words(config)),
                                          timeout_cycles=TIMEOUT,
                                          region_words=region_words(config),
                                          error_counters=config.link_error_counters)
    wiring.connect(m, link.bus, npu.host)
    m.d.comb += link.running.eq(npu.running)
    received = bytearray()
    finished = {}

    async def host(ctx):
        for kind, value in steps:
            if kind == "send":
                for byte in value:
                    ctx.set(link.rx.payload, byte)
                    ctx.set(link.rx.valid, 1)
                    await ctx.tick().until(link.rx.ready)
                ctx.set(link.rx.valid, 0)
            else:
                await ctx.tick().repeat(value)
        await ctx.tick().repeat(600)
        finished["yes"] = True

    async def device_tx(ctx):
        ctx.set(link.tx.ready, 1)
        while "yes" not in finished:
            if ctx.get(link.tx.valid):
                received.append(ctx.get(link.tx.payload))
            await ctx.tick()

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(host)
    sim.add_testbench(device_tx)
    sim.run()
    parser = ResponseParser()
    return parser.feed(bytes(received)), parser.dropped


def words(*values):
    return struct.pack(f"<{len(values)}I", *values)


def test_identify_write_read():
    instructions = address(Region.INSTRUCTIONS, 0)
    responses, dropped = run_session([
        ("send", encode_request(Command.IDENTIFY, 1)),
        ("send", encode_request(Command.WRITE, 2, words(instructions, 11, 22, 33, 44))),
        ("send", encode_request(Command.READ, 3, struct.pack("<IH", instructions, 4))),
        ("send", encode_request(Command.READ, 4, struct.pack("<IH", instructions, 0))),
        ("send", encode_request(Command.IDENTIFY, 5, b"x")),
    ])
    assert dropped == 0
    assert [(r.command, r.seq, r.status) for r in responses] == [
        (Command.IDENTIFY, 1, LinkStatus.OK), (Command.WRITE, 2, LinkStatus.OK),
        (Command.READ, 3, LinkStatus.OK), (Command.READ, 4, LinkStatus.BAD_LENGTH),
        (Command.IDENTIFY, 5, LinkStatus.BAD_LENGTH)]
    assert responses[0].words() == identity_words(CONFIG)
    assert responses[2].words() == [11, 22, 33, 44]


def test_length_rules():
    """Each command's payload length is checked before it runs: a wrong one is answered
    BAD_LENGTH and does nothing (the write of an address alone is an empty write)."""
    base = address(Region.ACTIVATIONS, 0)
    responses, dropped = run_session([
        ("send", encode_request(Command.WRITE, 1, words(base))),
        ("send", encode_request(Command.WRITE, 2, words(base, 5)[:7])),
        ("send", encode_request(Command.WRITE, 3)),
        ("send", encode_request(Command.READ, 4, words(base))),
        ("send", encode_request(Command.START, 5, words(0))),
        ("send", encode_request(Command.IDENTIFY, 6)),
        ("send", encode_request(Command.READ, 7, struct.pack("<IH", base, 1))),
    ])
    assert dropped == 0
    assert [(r.seq, r.status) for r in responses] == [
        (1, LinkStatus.OK), (2, LinkStatus.BAD_LENGTH), (3, LinkStatus.BAD_LENGTH),
        (4, LinkStatus.BAD_LENGTH), (5, LinkStatus.BAD_LENGTH), (6, LinkStatus.OK),
        (7, LinkStatus.OK)]
    assert responses[-1].words() == [0], "the refused write must not have written"


@pytest.mark.parametrize("counted", [True, False])
def test_errors_are_dropped_counted_and_survived(counted):
    """Bad frames get no answer and change nothing; the link counts each kind (an SoC
    generated without link_error_counters keeps none: LINK_STATUS answers no words)."""
    config = CONFIG.replace(link_error_counters=counted)
    base = address(Region.ACTIVATIONS, 0)
    good = encode_request(Command.WRITE, 1, words(base, 7, 8))
    corrupt = bytearray(encode_request(Command.WRITE, 2, words(base, 99, 99)))
    corrupt[9] ^= 0x10  # a flipped payload bit: the CRC no longer matches
    oversize = bytes([0xA5, Command.WRITE, 3]) + struct.pack("<H", 5000) + b"\x00" * 8
    truncated = encode_request(Command.WRITE, 4, words(base, 55, 55))[:9]
    responses, _ = run_session([
        ("send", good),
        ("send", b"\x00\x13\x37garbage"),   # 10 noise bytes
        ("send", bytes(corrupt)),
        ("send", oversize),
        ("send", truncated), ("idle", TIMEOUT + 20),
        ("send", encode_request(0x77, 5)),
        ("send", encode_request(Command.READ, 6, struct.pack("<IH", base, 2))),
        ("send", encode_request(Command.LINK_STATUS, 7)),
        ("send", encode_request(Command.RESET, 8)),
        ("send", encode_request(Command.LINK_STATUS, 9)),
    ], config)
    by_seq = {r.seq: r for r in responses}
    assert sorted(by_seq) == [1, 5, 6, 7, 8, 9], "bad frames must get no answer"
    assert by_seq[5].status == LinkStatus.UNKNOWN_COMMAND
    assert by_seq[6].words() == [7, 8], "the corrupt and truncated writes changed nothing"
    if not counted:
        assert by_seq[7].status == LinkStatus.OK and by_seq[7].words() == []
        assert by_seq[9].words() == []
        return
    counts = dict(zip(LINK_COUNTERS, by_seq[7].words(), strict=True))
    # The oversize frame's 8 trailing bytes are noise, too.
    assert counts == {"noise_bytes": 18, "bad_crc": 1, "oversize": 1, "truncated": 1,
                      "unknown_command": 1, "framing_errors": 0, "bad_address": 0}
    assert by_seq[9].words() == [0] * len(LINK_COUNTERS)


@pytest.mark.parametrize("pause, kept", [(TIMEOUT, True), (TIMEOUT + 1, False)])
def test_a_frame_waits_timeout_cycles_for_its_next_byte(pause, kept):
    """A frame's bytes may lie ``timeout_cycles`` apart (here the testbench's pause of
    TIMEOUT cycles); one cycle more and the frame is dropped as truncated."""
    base = address(Region.ACTIVATIONS, 0)
    frame = encode_request(Command.WRITE, 1, words(base, 7, 8))
    responses, _ = run_session([("send", frame[:6]), ("idle", pause), ("send", frame[6:]),
                                ("send", encode_request(Command.LINK_STATUS, 2))])
    by_seq = {r.seq: r for r in responses}
    assert (1 in by_seq) == kept
    truncated = dict(zip(LINK_COUNTERS, by_seq[2].words(), strict=True))["truncated"]
    assert truncated == (0 if kept else 1)


def test_a_matmul_through_the_link():
    rng = np.random.default_rng(3)
    a, w = rng.integers(-128, 128, (5, 3)), rng.integers(-128, 128, (3, 3))
    job, plan = matmul_job(CONFIG, a, w)
    golden = run_golden(job)
    addresses, data = job.host_writes()
    steps, seq = [], 0
    # Consecutive host addresses go in one WRITE each.
    runs = np.split(np.arange(len(addresses)), np.where(np.diff(addresses) != 1)[0] + 1)
    for run in runs:
        seq += 1
        steps.append(("send", encode_request(
            Command.WRITE, seq, words(int(addresses[run[0]]), *map(int, data[run])))))
    steps += [("send", encode_request(Command.START, 100, words(0, 7))),
              ("send", encode_request(Command.START, 99, words(0, 7))),  # a retry: no restart
              ("idle", 400),
              ("send", encode_request(Command.STATUS, 101)),
              ("send", encode_request(Command.COUNTERS, 102))]
    first = job.read_addresses("y")
    steps.append(("send", encode_request(Command.READ, 103,
                                         struct.pack("<IH", int(first[0]), len(first)))))
    responses, _ = run_session(steps)
    by_seq = {r.seq: r for r in responses}
    assert all(r.status == LinkStatus.OK for r in responses)
    status, _, pc, token = by_seq[101].words()
    assert Status(status) == Status.DONE and token == 7
    assert by_seq[100].words()[3] == by_seq[99].words()[3] == 7
    counter_words = by_seq[102].words()
    counters = [counter_words[2 * i] | counter_words[2 * i + 1] << 32
                for i in range(len(COUNTER_NAMES))]
    assert counters == list(golden.counters.as_dict().values())
    result = job.decode_read("y", np.array(by_seq[103].words()))
    y = matmul_output(plan, type(golden)(outputs={"y": result}, counters=golden.counters))
    assert np.array_equal(y, a @ w)


@pytest.mark.parametrize("config", [CONFIG, UNEVEN_CONFIG], ids=["power-of-two", "uneven"])
def test_addresses_past_a_region_are_refused_and_counted(config):
    """A READ or WRITE that reaches past a memory, past the registers' block or into no
    region is answered BAD_ADDRESS, counted, and moves no word; one that ends exactly at
    a region's end is fine, also where the memory's depth is not a power of two."""
    sizes = region_words(config)
    weights_end = address(Region.WEIGHTS, sizes[Region.WEIGHTS])
    registers_end = address(Region.REGISTERS, sizes[Region.REGISTERS])
    responses, dropped = run_session([
        ("send", encode_request(Command.WRITE, 1, words(weights_end - 2, 1, 2))),
        ("send", encode_request(Command.WRITE, 2, words(weights_end - 2, 3, 4, 5))),
        ("send", encode_request(Command.READ, 3, struct.pack("<IH", weights_end - 2, 3))),
        ("send", encode_request(Command.READ, 4, struct.pack("<IH", weights_end - 2, 2))),
        ("send", encode_request(Command.READ, 5, struct.pack("<IH", 0xFF000000, 1))),
        ("send", encode_request(Command.WRITE, 6, words(0x06000000, 9))),
        ("send", encode_request(Command.READ, 7, struct.pack("<IH", registers_end - 1, 1))),
        ("send", encode_request(Command.READ, 8, struct.pack("<IH", registers_end, 1))),
        ("send", encode_request(Command.READ, 9, struct.pack("<IH", 0x02FFFFFF, 2))),
        ("send", encode_request(Command.LINK_STATUS, 10)),
    ], config)
    assert dropped == 0
    assert [(r.seq, r.status) for r in responses] == [
        (1, LinkStatus.OK), (2, LinkStatus.BAD_ADDRESS), (3, LinkStatus.BAD_ADDRESS),
        (4, LinkStatus.OK), (5, LinkStatus.BAD_ADDRESS), (6, LinkStatus.BAD_ADDRESS),
        (7, LinkStatus.OK), (8, LinkStatus.BAD_ADDRESS), (9, LinkStatus.BAD_ADDRESS),
        (10, LinkStatus.OK)]
    assert responses[3].words() == [1, 2], "the refused write must not have written"
    counts = dict(zip(LINK_COUNTERS, responses[-1].words(), strict=True))
    assert counts["bad_address"] == 6


def job_writes(job, first_seq=1):
    """WRITE frames that load ``job``: one per run of consecutive host addresses."""
    addresses, data = job.host_writes()
    runs = np.split(np.arange(len(addresses)), np.where(np.diff(addresses) != 1)[0] + 1)
    return [("send", encode_request(Command.WRITE, first_seq + i,
                                    words(int(addresses[run[0]]), *map(int, data[run]))))
            for i, run in enumerate(runs)]


def test_start_tokens():
    """A START names its run: token 0 or a too-wide one is refused, a repeated token does
    not restart (its answer is the run's state), a START during a run is BUSY, RESET
    forgets the token."""
    rng = np.random.default_rng(4)
    job, _ = matmul_job(CONFIG, rng.integers(-128, 128, (10, 6)), rng.integers(-128, 128, (6, 6)))
    steps = job_writes(job, 1)
    responses, _ = run_session(steps + [
        ("send", encode_request(Command.START, 100, words(0, 0))),
        ("send", encode_request(Command.START, 101, words(0, 1 << RUN_TOKEN_BITS))),
        ("send", encode_request(Command.START, 102, words(0, 5))),
        ("send", encode_request(Command.START, 103, words(0, 6))),   # during the run
        ("send", encode_request(Command.START, 104, words(0, 5))),   # a retry
        ("idle", 600),
        ("send", encode_request(Command.STATUS, 105)),
        ("send", encode_request(Command.RESET, 106)),
        ("send", encode_request(Command.STATUS, 107)),
        ("send", encode_request(Command.START, 108, words(0, 5))),
        ("idle", 600),
        ("send", encode_request(Command.STATUS, 109)),
    ])
    by_seq = {r.seq: r for r in responses}
    assert by_seq[100].status == by_seq[101].status == LinkStatus.BAD_TOKEN
    assert by_seq[102].status == LinkStatus.OK
    status, _, _, token = by_seq[102].words()
    assert Status.RUNNING in Status(status) and token == 5
    assert by_seq[103].status == LinkStatus.BUSY
    assert by_seq[104].status == LinkStatus.OK and by_seq[104].words()[3] == 5
    status, _, _, token = by_seq[105].words()
    assert Status(status) == Status.DONE and token == 5
    assert by_seq[107].words()[3] == 0, "RESET forgets the last run's token"
    assert by_seq[108].status == LinkStatus.OK, "after RESET the same token starts a run"
    status, _, _, token = by_seq[109].words()
    assert Status(status) == Status.DONE and token == 5
