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
from npugen.demo import digits, mlp_to_onnx, train_mlp
from npugen.driver import Device, DeviceError
from npugen.hw.dsp import ICE40_MAC_STANDIN
from npugen.importers import load_onnx
from npugen.memory_map import Region, address, identity_words
from npugen.protocol import Command, LinkStatus, encode_request, encode_response
from npugen.runtime import run
from npugen.sim.runner import build_folder

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
        result = device.run(program, x_test[:40])
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


def test_answers_read_together_are_all_kept():
    """Two answers in one read: the second must not be lost (it once cost a 5 s retry)."""
    with Device.open("loop://", timeout=0.3, retries=0) as device:
        for seq in (1, 2):
            device._port.write(encode_response(Command.WRITE, seq, LinkStatus.OK))
        answers = device.requests(Command.WRITE, [struct.pack("<I", 0)] * 2)
    assert [a.seq for a in answers] == [1, 2] and device.retried == 0


def test_icebreaker_default_runs_the_demo_mlp():
    """The iCEBreaker's default NPU (4x2, 16K weight words), simulated as its build maps it
    (SB_MAC16 pairs, the weights in SPRAM), runs the demo MLP 64-64-32-10 through the UART:
    the golden output and cycles."""
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
        result = device.run(program, x_test[:24])
    assert np.array_equal(result.quantized_output, golden.quantized_output)
    assert result.counters == golden.counters
    next(served, None)
