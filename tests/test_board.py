"""The virtual board through the driver: a compiled model gives the golden output, and
the link survives garbage, truncated frames, flipped bits, oversize lengths, unknown
commands and a client that disconnects mid-frame, without corrupting loaded data."""

import json
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from npugen.cli import main
from npugen.compiler import compile_model
from npugen.config import NpuConfig
from npugen.driver import Device, DeviceError
from npugen.hw.dsp import ICE40_MAC_STANDIN
from npugen.importers import load_onnx
from npugen.memory_map import Region, address, identity_words
from npugen.protocol import MAX_PAYLOAD_WORDS, Command, LinkStatus, encode_request, encode_response
from npugen.runtime import run
from npugen.sim.runner import build_folder
from npugen.train import digits, mlp_to_onnx, train_mlp

CONFIG = NpuConfig(rows=4, cols=4, activation_depth=1024, weight_depth=2048,
                   accumulator_depth=512, instruction_depth=256, param_depth=64)


def serve_sim(*extra: str, config: NpuConfig | None = CONFIG):
    """A running ``npugen serve-sim`` of ``config`` (none: ``extra`` names it); yields its
    URL."""
    flags = []
    for name, value in (config.to_dict().items() if config else ()):
        flags += [f"--{name.replace('_', '-')}", str(value)]
    server = subprocess.Popen([sys.executable, "-m", "npugen", "serve-sim", "--port", "0",
                               *flags, *extra], stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline().strip()
    assert line.startswith("listening on socket://127.0.0.1:"), line
    yield line.removeprefix("listening on ")
    server.terminate()
    assert server.wait(timeout=30) == 0, "serve-sim must stop cleanly on SIGTERM"


@pytest.fixture(scope="module")
def board():
    yield from serve_sim()


# The primitive each family's mapping instantiates (hw/dsp.py).
MAPPED_PRIMITIVES = {"ecp5": "MULT18X18D", "ice40": ICE40_MAC_STANDIN}


@pytest.fixture(scope="module", params=["generic", *MAPPED_PRIMITIVES])
def any_board(request, board):
    """The generic virtual board, and those with the ECP5 and the iCE40 mappings (DSP
    blocks; on iCE40 also the weights in SPRAM)."""
    if request.param == "generic":
        yield board
    else:
        served = serve_sim("--primitives", request.param)
        url = next(served)
        # The board that answers was built with the family's primitives and their models.
        folder = build_folder(CONFIG, "verilator", "board", request.param)
        primitive = MAPPED_PRIMITIVES[request.param]
        assert f"{primitive} #(" in (folder / "board.v").read_text()
        assert (folder / f"{primitive}.v").exists()
        if request.param == "ice40":  # and the weights in SPRAM (hw/ram.py)
            assert "SB_SPRAM256KA " in (folder / "board.v").read_text()
            assert (folder / "SB_SPRAM256KA.v").exists()
        yield url
        yield from served


def raw_connection(url: str) -> socket.socket:
    host, port = url.removeprefix("socket://").split(":")
    return socket.create_connection((host, int(port)))


def test_model_through_the_uart_matches_golden(any_board):
    x_train, x_test, y_train, _ = digits()
    classifier = train_mlp(x_train, y_train, (32,))
    program = compile_model(load_onnx(mlp_to_onnx(classifier, "/dev/null")), CONFIG,
                            calibration=x_train[:128], batch=16)
    golden = run(program, x_test[:40])
    with Device.open(any_board) as device:
        assert device.identify() == CONFIG
        device.load(program)
        result = run(program, x_test[:40], target=device)
    assert np.array_equal(result.quantized_output, golden.quantized_output)
    assert result.counters == golden.counters


def test_link_survives_bad_input_and_keeps_data(board):
    base = address(Region.WEIGHTS, 0)
    data = list(range(1000, 1064))
    with Device.open(board) as device:
        device.reset()
        device.write(base, data)
    # The board serves one client at a time: the bad bytes come on a connection of their own.
    junk = raw_connection(board)
    corrupt = bytearray(encode_request(Command.WRITE, 9, struct.pack("<I5I", base, *[7] * 5)))
    corrupt[12] ^= 0x04
    junk.sendall(b"\x00\xff\x13garbage\x5a")                               # 11 noise bytes
    junk.sendall(bytes(corrupt))                                            # a flipped bit
    junk.sendall(bytes([0xA5, Command.WRITE, 1]) + struct.pack("<H", 9000))  # oversize
    junk.sendall(encode_request(Command.WRITE, 2, struct.pack("<I3I", base, 1, 2, 3))[:8])
    time.sleep(0.5)                         # the truncated frame times out on the board
    junk.sendall(encode_request(0x6E, 3))                                   # unknown command
    junk.sendall(encode_request(Command.WRITE, 4, struct.pack("<I4I", base, 5, 5, 5, 5))[:10])
    junk.close()                            # a client gone mid-frame
    time.sleep(0.5)
    with Device.open(board) as device:
        assert device.identify() == CONFIG
        assert device.read(base, len(data)) == data, "loaded data must survive"
        counts = device.link_status()
    assert counts["bad_crc"] == 1 and counts["oversize"] == 1
    assert counts["truncated"] == 2 and counts["unknown_command"] == 1
    assert counts["noise_bytes"] >= 11


def test_driver_errors(board):
    x_train, _, y_train, _ = digits()
    program = compile_model(load_onnx(mlp_to_onnx(train_mlp(x_train, y_train, (16,)),
                                                   "/dev/null")),
                            CONFIG.replace(rows=2, cols=2, requant_lanes=2),
                            calibration=x_train[:64])
    with Device.open(board) as device:
        with pytest.raises(DeviceError, match="rows: program 2, NPU 4"):
            device.load(program)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    url = f"socket://127.0.0.1:{silent.getsockname()[1]}"
    with Device.open(url, timeout=0.2, retries=1) as device:
        with pytest.raises(DeviceError, match="no answer to IDENTIFY .* after 2 tries"):
            device.identify()
    silent.close()
    with pytest.raises(DeviceError, match="cannot open"):
        Device.open(url)


def test_cli_run_on_the_virtual_board(board, tmp_path, capsys):
    """serve-sim in one process, `npugen run --target socket://...` in another."""
    x_train, x_test, y_train, _ = digits()
    program = compile_model(load_onnx(mlp_to_onnx(train_mlp(x_train, y_train, (16,)),
                                                   "/dev/null")),
                            CONFIG, calibration=x_train[:64], batch=8)
    path, x_path, y_path = tmp_path / "p.npu", tmp_path / "x.npy", tmp_path / "y.npy"
    program.save(path)
    np.save(x_path, x_test[:12])
    assert main(["run", str(path), "--input", str(x_path), "-o", str(y_path),
                 "--target", board, "--json"]) == 0
    assert np.array_equal(np.load(y_path), run(program, x_test[:12]).output)
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["target"] == board and record["runs"] == 2
    assert main(["run", str(path), "--input", str(x_path), "-o", str(y_path),
                 "--target", "socket://127.0.0.1:1"]) == 2
    assert "cannot open 'socket://127.0.0.1:1'" in capsys.readouterr().err


def test_identity_words_cover_the_config(board):
    with Device.open(board) as device:
        words = device.request(Command.IDENTIFY).words()
    assert words == identity_words(CONFIG)


def test_wrong_device_is_named():
    """A device that answers IDENTIFY with a foreign magic number is refused."""
    with Device.open("loop://", timeout=0.5, retries=0) as device:
        # loop:// echoes writes back: queue the foreign device's answer first.
        device._port.write(encode_response(Command.IDENTIFY, 1, LinkStatus.OK,
                                           struct.pack("<3I", 0xDEADBEEF, 1, 8)))
        with pytest.raises(DeviceError, match="not an npugen NPU: magic 0xdeadbeef"):
            device.identify()


@pytest.mark.parametrize("status, reason", [
    (LinkStatus.BAD_ADDRESS, r"BAD_ADDRESS \(the addresses reach past"),
    (0x2A, "status 42, which this host does not know"),
])
def test_a_refusal_names_its_status(status, reason):
    """A refusal names the device's status; one this host does not know keeps its code."""
    with Device.open("loop://", timeout=0.3, retries=0) as device:
        device._port.write(encode_response(Command.WRITE, 1, status))
        with pytest.raises(DeviceError, match=f"WRITE refused by loop://: {reason}"):
            device.request(Command.WRITE, struct.pack("<I", 0))


def test_answers_read_together_are_all_kept():
    """Two answers in one read: the second must not be lost (it once cost a 5 s retry)."""
    with Device.open("loop://", timeout=0.3, retries=0) as device:
        for seq in (1, 2):
            device._port.write(encode_response(Command.WRITE, seq, LinkStatus.OK))
        answers = device.requests(Command.WRITE, [struct.pack("<I", 0)] * 2)
    assert [a.seq for a in answers] == [1, 2] and device.retried == 0


@pytest.mark.slow  # the iCEBreaker's SoC on Verilator
def test_icebreaker_default_runs_the_demo_mlp():
    """The iCEBreaker's default NPU (its UP5K profile: 4x4, 16K weight words, 8K
    single-port activation words), simulated as its build maps it (SB_MAC16 pairs holding
    the weights, the weights and activations in SPRAM), runs the demo MLP 64-64-32-10
    through the UART: the golden output and cycles."""
    from npugen.boards import BOARDS

    config = BOARDS["icebreaker"].default_config
    x_train, x_test, y_train, _ = digits()
    classifier = train_mlp(x_train, y_train, (64, 32))
    program = compile_model(load_onnx(mlp_to_onnx(classifier, "/dev/null")), config,
                            calibration=x_train[:256])
    golden = run(program, x_test[:24])
    served = serve_sim("--board", "icebreaker", config=None)
    url = next(served)
    folder = build_folder(config, "verilator", "board", "ice40")
    assert "SB_SPRAM256KA " in (folder / "board.v").read_text()
    with Device.open(url) as device:
        assert device.identify() == config
        device.load(program)
        result = run(program, x_test[:24], target=device)
    assert np.array_equal(result.quantized_output, golden.quantized_output)
    assert result.counters == golden.counters
    next(served, None)


@pytest.mark.slow  # KWS on the iCEBreaker's SoC, on Verilator with its primitives
def test_icebreaker_default_runs_kws_bit_exact_with_litert():
    """MLPerf Tiny's keyword spotter, compiled for the iCEBreaker's default (nine stages),
    runs on its virtual board (the SB_MAC16s holding the weights, weights and activations
    in SPRAM) through the UART: LiteRT's reference outputs, and the golden model's
    outputs and cycles."""
    from conftest import MLPERF_TINY, litert_reference
    from npugen.boards import BOARDS

    path = MLPERF_TINY / "kws_ref_model.tflite"
    program = compile_model(path, BOARDS["icebreaker"].default_config)
    x = np.random.default_rng(7).integers(-128, 128, size=(1, 49, 10, 1), dtype=np.int8)
    golden = run(program, x)
    served = serve_sim("--board", "icebreaker", config=None)
    with Device.open(next(served)) as device:
        result = run(program, x, target=device)
    np.testing.assert_array_equal(result.quantized_output,
                                  litert_reference(path)(x).reshape(1, -1))
    np.testing.assert_array_equal(result.quantized_output, golden.quantized_output)
    assert result.counters == golden.counters
    next(served, None)


@pytest.mark.slow  # a virtual board on Verilator
def test_a_lean_board_runs_a_model_and_reports_only_what_it_counts():
    """A board with the UP5K's lean options (serial requantizer product, only the cycles
    counter, no link error counters, no max pooling or adds, one weight bank, rows
    broadcast) runs an MLP through the UART
    equal to the golden model, cycles included; the counters it does not keep come back
    absent (None), and LINK_STATUS with none."""
    config = CONFIG.replace(requant_lanes=1, requant_serial_bits=4, activity_counters=False,
                            link_error_counters=False, max_pooling=False, adds=False,
                            weight_banks=1, row_broadcast=True, load_skew=False)
    x_train, x_test, y_train, _ = digits()
    program = compile_model(load_onnx(mlp_to_onnx(train_mlp(x_train, y_train, (16,)),
                                                  "/dev/null")), config,
                            calibration=x_train[:256])
    golden = run(program, x_test[:8])
    assert golden.counters.busy_cycles is None and golden.counters.cycles > 0
    served = serve_sim(config=config)
    with Device.open(next(served)) as device:
        assert device.identify() == config
        device.load(program)
        result = run(program, x_test[:8], target=device)
        assert device.link_status() == {}
    assert np.array_equal(result.quantized_output, golden.quantized_output)
    assert result.counters == golden.counters
    next(served, None)


@pytest.fixture(scope="module")
def small_program():
    """A 64-16-10 MLP for CONFIG, 8 inputs a run, and the digits to feed it."""
    x_train, x_test, y_train, _ = digits()
    program = compile_model(load_onnx(mlp_to_onnx(train_mlp(x_train, y_train, (16,)),
                                                   "/dev/null")),
                            CONFIG, calibration=x_train[:64], batch=8)
    return program, x_test


def assert_golden(program, x, result):
    golden = run(program, x)
    assert np.array_equal(result.quantized_output, golden.quantized_output)
    assert result.counters == golden.counters


def test_consecutive_cli_runs_return_their_own_outputs(board, small_program, tmp_path):
    """Each `npugen run` opens a new session that starts at seq 1; each must return its
    own inputs' outputs, whatever ran before (same sizes, smaller, larger)."""
    program, x_test = small_program
    path = tmp_path / "p.npu"
    program.save(path)
    for index, (start, count) in enumerate([(0, 8), (8, 8), (16, 3), (19, 13), (40, 8),
                                            (60, 1)]):
        x = x_test[start:start + count]
        x_path, y_path = tmp_path / f"x{index}.npy", tmp_path / f"y{index}.npy"
        np.save(x_path, x)
        command = [sys.executable, "-m", "npugen", "run", str(path), "--input", str(x_path),
                   "-o", str(y_path), "--target", board]
        if index < 2:   # two as separate processes, as a user types them
            finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
            assert finished.returncode == 0, finished.stderr
        else:
            assert main(command[3:]) == 0
        assert np.array_equal(np.load(y_path), run(program, x).output), f"run {index}"


def test_one_session_longer_than_the_sequence_space(board, small_program):
    """Sequence numbers wrap after 255 frames (here 390 STATUS polls and the runs' frames:
    they wrap twice); runs before and after each wrap return their own outputs."""
    program, x_test = small_program
    with Device.open(board) as device:
        device.load(program)
        for round_ in range(3):
            for _ in range(130):
                device.status()
            x = x_test[8 * round_:8 * round_ + 8 + round_]
            assert_golden(program, x, run(program, x, target=device))


def test_a_reset_behind_the_drivers_back(board, small_program):
    """RESET from elsewhere between runs: the next run works. RESET during a run: the
    driver sees the token change and refuses the outputs (DeviceLost), and the run after
    that works."""
    from npugen.driver import DeviceLost

    program, x_test = small_program
    with Device.open(board) as device:
        device.load(program)
        assert_golden(program, x_test[:8], run(program, x_test[:8], target=device))
        device.request(Command.RESET)       # the driver's own bookkeeping is not told
        assert_golden(program, x_test[8:16], run(program, x_test[8:16], target=device))
        real_run_state = device.run_state

        def reset_while_polled():
            device.request(Command.RESET)
            return real_run_state()

        device.run_state = reset_while_polled
        with pytest.raises(DeviceLost, match="was lost: the device reports run token 0"):
            run(program, x_test[16:24], target=device)
        device.run_state = real_run_state
        assert_golden(program, x_test[24:32], run(program, x_test[24:32], target=device))


def test_a_second_client_is_told_the_board_is_busy(board):
    with Device.open(board) as first:
        first.identify()
        started = time.monotonic()
        with Device.open(board, timeout=5.0) as second:
            with pytest.raises(DeviceError, match="busy: another client holds the virtual"):
                second.identify()
        assert time.monotonic() - started < 3.0, "told at once, not after time-outs"
        assert first.identify() == CONFIG, "the first client keeps the board"
    with Device.open(board) as later:
        assert later.identify() == CONFIG


def test_addresses_past_the_memories_are_refused(board):
    end = address(Region.WEIGHTS, CONFIG.weight_depth)   # weights: one word per entry
    with Device.open(board) as device:
        device.reset()
        with pytest.raises(DeviceError, match="BAD_ADDRESS"):
            device.read(end - 1, 2)
        with pytest.raises(DeviceError, match="BAD_ADDRESS"):
            device.write(0xFF000000, [1])
        assert device.read(end - 1, 1) == [device.read(end - 1, 1)[0]]
        assert device.link_status()["bad_address"] == 2


def abuse_garbage(junk, url):
    junk.sendall(b"\x00\xff\x13garbage\x5a" * 50)


def abuse_bad_crc(junk, url):
    for seq in range(20):
        frame = bytearray(encode_request(Command.WRITE, seq, struct.pack(
            "<I4I", address(Region.INSTRUCTIONS, 0), 9, 9, 9, 9)))
        frame[8 + seq % 8] ^= 1 << (seq % 8)
        junk.sendall(bytes(frame))


def abuse_truncated_and_oversize(junk, url):
    junk.sendall(encode_request(Command.WRITE, 1, struct.pack(
        "<I3I", address(Region.WEIGHTS, 0), 1, 2, 3))[:9])
    time.sleep(0.5)
    junk.sendall(bytes([0xA5, Command.WRITE, 2]) + struct.pack("<H", 60000) + b"\x11" * 64)


def abuse_disconnect_mid_upload(junk, url):
    frame = encode_request(Command.WRITE, 3, struct.pack(
        f"<I{MAX_PAYLOAD_WORDS}I", address(Region.WEIGHTS, 0), *range(MAX_PAYLOAD_WORDS)))
    junk.sendall(frame[:500])


def abuse_start_without_program(junk, url):
    """A bare START with a foreign token, and a RESET: the next session must cope."""
    junk.sendall(encode_request(Command.START, 1, struct.pack("<II", 0, 4242)))
    time.sleep(0.2)
    junk.sendall(encode_request(Command.RESET, 2))


@pytest.mark.parametrize("abuse", [abuse_garbage, abuse_bad_crc, abuse_truncated_and_oversize,
                                   abuse_disconnect_mid_upload, abuse_start_without_program])
def test_after_link_abuse_a_run_is_still_exact(board, small_program, abuse):
    """After each kind of abuse on a connection of its own, the next session's run
    returns exactly the golden outputs (the program is loaded before the abuse: a write
    that the abuse corrupted would show)."""
    program, x_test = small_program
    with Device.open(board) as device:
        device.load(program)
    junk = raw_connection(board)
    abuse(junk, board)
    junk.close()
    time.sleep(0.6)   # a truncated frame times out on the board
    with Device.open(board) as device:
        assert_golden(program, x_test[:8], run(program, x_test[:8], target=device))
        device.load(program)   # and a fresh upload verifies
        assert_golden(program, x_test[8:16], run(program, x_test[8:16], target=device))


@pytest.mark.slow  # a virtual board on Verilator
def test_virtual_board_killed_mid_run(small_program, tmp_path):
    """The board dies while `npugen run` waits on it: exit 1 and one line saying the
    board was lost, no traceback, no output file."""
    program, x_test = small_program
    path, x_path, y_path = tmp_path / "p.npu", tmp_path / "x.npy", tmp_path / "y.npy"
    program.save(path)
    np.save(x_path, x_test[:200])      # 25 runs: long enough to be killed during one
    flags = [item for name, value in CONFIG.to_dict().items()
             for item in (f"--{name.replace('_', '-')}", str(value))]
    server = subprocess.Popen([sys.executable, "-m", "npugen", "serve-sim", "--port", "0",
                               *flags], stdout=subprocess.PIPE, text=True)
    url = server.stdout.readline().strip().removeprefix("listening on ")
    client = subprocess.Popen([sys.executable, "-m", "npugen", "run", str(path), "--input",
                               str(x_path), "-o", str(y_path), "--target", url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    assert client.poll() is None, "the run must still be on when the board dies"
    server.kill()   # the simulator follows its parent (sim/tb_board.py)
    server.wait()
    _, stderr = client.communicate(timeout=120)
    assert client.returncode == 1, stderr
    assert "Traceback" not in stderr and "lost" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not y_path.exists(), "no outputs written for a lost run"
