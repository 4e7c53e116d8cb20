"""Bad input on the command line: exit 2 and one line on stderr naming the value (issue 19).

Each row runs ``python -m npugen ...`` in a subprocess, so an uncaught exception shows as a
traceback: the exit status, a word the message must hold, no traceback, one line.
"""

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from npugen import NpuConfig, compile_model
from npugen.graph import Dense, Model

FEATURES, CLASSES, BATCH = 8, 4, 8


def tiny_program(path: Path) -> None:
    """An 8-4 dense layer on the default 8×8 NPU, batch 8: compiles in milliseconds."""
    rng = np.random.default_rng(5)
    model = Model([Dense("fc", rng.normal(size=(FEATURES, CLASSES)).astype(np.float32),
                         np.zeros(CLASSES, np.float32))], (FEATURES,), (CLASSES,))
    compile_model(model, NpuConfig(), rng.normal(size=(32, FEATURES)), batch=BATCH).save(path)


def qdq_onnx(path: Path, input_type: str = "float", dequantize_input: bool = True) -> None:
    """A QDQ MatMul model; ``input_type`` "int8" (tf2onnx-style: the graph input is int8,
    read by a DequantizeLinear) or "uint8" (not supported)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    constants = {
        "s_in": np.float32(0.05), "z_in": np.int8(-3), "s_w": np.float32(0.02),
        "z_w": np.int8(0), "s_out": np.float32(0.1), "z_out": np.int8(4),
        "w_q": rng.integers(-127, 128, (FEATURES, CLASSES)).astype(np.int8)}
    initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "s_w", "z_w"], ["w"])]
    if input_type == "float":
        nodes += [helper.make_node("QuantizeLinear", ["input", "s_in", "z_in"], ["x_q"]),
                  helper.make_node("DequantizeLinear", ["x_q", "s_in", "z_in"], ["x"])]
    elif dequantize_input:
        nodes.append(helper.make_node("DequantizeLinear", ["input", "s_in", "z_in"], ["x"]))
    x = "x" if input_type == "float" or dequantize_input else "input"
    nodes += [helper.make_node("MatMul", [x, "w"], ["y"], name="fc"),
              helper.make_node("QuantizeLinear", ["y", "s_out", "z_out"], ["y_q"]),
              helper.make_node("DequantizeLinear", ["y_q", "s_out", "z_out"], ["logits"])]
    element = {"float": TensorProto.FLOAT, "int8": TensorProto.INT8,
               "uint8": TensorProto.UINT8}[input_type]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("input", element, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(path))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad-input")
    tiny_program(folder / "p.npu")
    rng = np.random.default_rng(8)
    np.save(folder / "x.npy", rng.normal(size=(3, FEATURES)).astype(np.float32))
    np.save(folder / "one.npy", rng.normal(size=(1, FEATURES)).astype(np.float32))
    np.save(folder / "empty.npy", np.zeros((0, FEATURES), np.float32))
    np.save(folder / "calib.npy", rng.normal(size=(16, FEATURES)).astype(np.float32))
    (folder / "adir").mkdir()
    (folder / "afile").write_text("a file\n")
    (folder / "npu.toml").write_text("rows = 8\n")
    qdq_onnx(folder / "qdq.onnx")
    qdq_onnx(folder / "int8.onnx", "int8")
    qdq_onnx(folder / "int8_no_dq.onnx", "int8", dequantize_input=False)
    qdq_onnx(folder / "uint8.onnx", "uint8")
    import onnx

    dangling = onnx.load(folder / "qdq.onnx")
    next(node for node in dangling.graph.node if node.op_type == "MatMul").input[1] = "missing"
    onnx.save(dangling, folder / "dangling.onnx")
    np.savez(folder / "x.npz", x=rng.normal(size=(3, FEATURES)).astype(np.float32))
    # Stand-ins for openFPGALoader: one missing a shared library, one finding no board, one
    # that loads.
    for name, text, status in (
            ("nolib", "openFPGALoader: error while loading shared libraries: libftdi1.so.2: "
                      "cannot open shared object file: No such file or directory", 127),
            ("noboard", "unable to open ftdi device: -3 (device not found)", 1),
            ("loads", "Load SRAM: DONE", 0)):
        tools = folder / name
        tools.mkdir()
        loader = tools / "openFPGALoader"
        loader.write_text(f"#!/bin/sh\necho '{text}' >&2\nexit {status}\n")
        loader.chmod(loader.stat().st_mode | stat.S_IEXEC)
    (folder / "bitstream.bin").write_bytes(b"\0" * 16)
    return folder


def npugen(folder: Path, argv: list[str], tools: str | None = None):
    env = dict(os.environ)
    if tools:
        env["PATH"] = f"{folder / tools}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([sys.executable, "-m", "npugen", *argv], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


def check_refusal(run, status: int, word: str) -> None:
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == status, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert word in lines[0], lines[0]


BIG = "100000x100000x100000"

# (case, argv, exit status, a word the message holds)
CASES = [
    # 1. a directory where a file is expected
    ("config-dir", ["matmul", "--random", "4x4x4", "--config", "adir"], 2, "is a directory"),
    ("run-program-dir", ["run", "adir", "--input", "x.npy", "-o", "y.npy"], 2,
     "is a directory"),
    ("inspect-program-dir", ["inspect", "adir"], 2, "is a directory"),
    ("sweep-grid-dir", ["sweep", "adir"], 2, "is a directory"),
    ("compile-model-dir", ["compile", "adir", "-o", "q.npu"], 2, "is a directory"),
    ("run-input-dir", ["run", "p.npu", "--input", "adir", "-o", "y.npy"], 2,
     "is a directory"),
    ("inspect-not-a-program", ["inspect", "afile"], 2, "not an npugen program"),
    # 2. outputs that cannot be written, refused before the work
    ("generate-o-file", ["generate", "-o", "afile"], 2, "is a file, not a folder"),
    ("generate-o-under-file", ["generate", "-o", "afile/out"], 2, "cannot create the folder"),
    ("matmul-o-missing-folder", ["matmul", "--random", "4x4x4", "-o", "nowhere/y.npy"], 2,
     "'nowhere' does not exist"),
    ("compile-o-missing-folder", ["compile", "qdq.onnx", "-o", "nowhere/p.npu"], 2,
     "'nowhere' does not exist"),
    ("run-o-missing-folder", ["run", "p.npu", "--input", "x.npy", "-o", "nowhere/y.npy"], 2,
     "'nowhere' does not exist"),
    ("run-o-dir", ["run", "p.npu", "--input", "x.npy", "-o", "adir"], 2, "is a directory"),
    ("demo-workdir-file", ["demo", "--target", "golden", "--workdir", "afile"], 2,
     "is a file, not a folder"),
    # the rescale tables, on an NPU that cannot have them
    ("generate-tables-no-overlap", ["generate", "-o", "gen", "--rescale-tables", "true"], 2,
     "set rescale_tables = false"),
    ("generate-tables-few-params", ["generate", "-o", "gen", "--rescale-tables", "true",
                                    "--requant-overlap", "true", "--param-depth", "16"], 2,
     "param_depth is 16"),
    # 3, 4. matmul's --random shape and --seed
    ("matmul-random-too-large", ["matmul", "--random", BIG], 2, BIG),
    ("matmul-negative-seed", ["matmul", "--random", "4x4x4", "--seed", "-1"], 2, "--seed"),
    # 5. targets, checked before any training or simulation
    ("demo-bad-target", ["demo", "--target", "foo"], 2, "'foo'"),
    ("run-bad-target", ["run", "p.npu", "--input", "x.npy", "-o", "y.npy", "--target",
                        "foo"], 2, "'foo'"),
    ("run-socket-without-port", ["run", "p.npu", "--input", "x.npy", "-o", "y.npy",
                                 "--target", "socket://localhost"], 2, "HOST:PORT"),
    ("matmul-bad-target", ["matmul", "--random", "4x4x4", "--target", "foo"], 2, "'foo'"),
    # --baud: only for a serial port, and a rate the board's clock divides to
    ("run-baud-on-sim", ["run", "p.npu", "--input", "x.npy", "-o", "y.npy", "--target", "sim",
                         "--baud", "3000000"], 2, "target 'sim' has none"),
    ("run-baud-on-socket", ["run", "p.npu", "--input", "x.npy", "-o", "y.npy", "--target",
                            "socket://127.0.0.1:9", "--baud", "9600"], 2, "a TCP socket"),
    ("matmul-baud-on-golden", ["matmul", "--random", "4x4x4", "--baud", "9600"], 2,
     "target 'golden' has none"),
    ("demo-baud-zero", ["demo", "--target", "/dev/ttyUSB9", "--baud", "0"], 2,
     "not 0"),
    ("build-baud-off", ["build", "--board", "icebreaker", "--baud", "2400000"], 2,
     "--baud 2400000 on the icebreaker: baud 2400000 from a 30000000 Hz clock is off by"),
    ("build-baud-too-fast", ["build", "--board", "ulx3s-12f", "--baud", "40000000"], 2,
     "at least 4 clock cycles a bit"),
    # 6. a device that cannot be opened is bad input
    ("run-nothing-listening", ["run", "p.npu", "--input", "x.npy", "-o", "y.npy", "--target",
                               "socket://127.0.0.1:1"], 2, "cannot open"),
    ("matmul-nothing-listening", ["matmul", "--random", "4x4x4", "--target",
                                  "socket://127.0.0.1:1"], 2, "cannot open"),
    # 9. no input rows
    ("run-empty-input", ["run", "p.npu", "--input", "empty.npy", "-o", "y.npy"], 2,
     "no rows"),
    # 10. --board is checked, and the program against the board's NPU
    ("run-unknown-board", ["run", "p.npu", "--input", "x.npy", "-o", "y.npy", "--board",
                           "nope"], 2, "known boards"),
    ("run-other-board", ["run", "p.npu", "--input", "x.npy", "-o", "y.npy", "--board",
                         "icebreaker"], 2, "rows: program 8, NPU 4"),
    ("run-other-flags", ["run", "p.npu", "--input", "x.npy", "-o", "y.npy", "--cols", "4"],
     2, "cols: program 8, NPU 4"),
    # 12, 13. QDQ models: --calib refused; graph inputs npugen cannot take are named
    ("compile-qdq-with-calib", ["compile", "qdq.onnx", "--calib", "calib.npy", "-o",
                                "q.npu"], 2, "already quantized (a QDQ model)"),
    ("compile-int8-input-no-dq", ["compile", "int8_no_dq.onnx", "-o", "q.npu"], 2,
     "input 'input' is int8 but no DequantizeLinear reads it"),
    ("compile-uint8-input", ["compile", "uint8.onnx", "-o", "q.npu"], 2,
     "input 'input' is uint8"),
    ("compile-dangling-input", ["compile", "dangling.onnx", "-o", "q.npu"], 2,
     "node 'fc' (MatMul): input 'missing' is not an initializer, the graph input or the "
     "output of a node before it"),
    # Flags that would go unused, and outputs that would destroy an input or land elsewhere
    ("matmul-random-with-operands", ["matmul", "--random", "4x4x4", "--a", "x.npy", "--w",
                                     "x.npy"], 2, "--a, --w would be left unused"),
    ("matmul-seed-without-random", ["matmul", "--a", "x.npy", "--w", "x.npy", "--seed", "3"],
     2, "there is no --random here"),
    ("run-sim-on-golden", ["run", "p.npu", "--input", "x.npy", "-o", "y.npy", "--sim",
                           "icarus"], 2, "this run's target is 'golden': leave --sim out"),
    ("matmul-sim-on-golden", ["matmul", "--random", "4x4x4", "--sim", "icarus"], 2,
     "leave --sim out"),
    ("run-empty-board-name", ["run", "p.npu", "--input", "x.npy", "-o", "y.npy", "--board",
                              ""], 2, "unknown board ''"),
    ("run-o-is-the-input", ["run", "p.npu", "--input", "x.npy", "-o", "x.npy"], 2,
     "-o 'x.npy' is the input file itself"),
    ("compile-o-is-the-model", ["compile", "qdq.onnx", "-o", "qdq.onnx"], 2,
     "-o 'qdq.onnx' is the model itself"),
    ("compile-o-is-the-config", ["compile", "qdq.onnx", "--config", "npu.toml", "-o",
                                 "npu.toml"], 2, "-o 'npu.toml' is the config file itself"),
    ("compile-o-is-the-calibration", ["compile", "qdq.onnx", "--calib", "calib.npy", "-o",
                                      "calib.npy"], 2, "is the calibration file itself"),
    ("run-input-npz", ["run", "p.npu", "--input", "x.npz", "-o", "y.npy"], 2,
     "is an .npz archive (arrays: x), not a .npy array"),
]


@pytest.mark.parametrize("argv, status, word", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_refused(work, argv, status, word):
    check_refusal(npugen(work, argv), status, word)



def test_npz_entries_not_read_are_refused(work):
    """A misspelt field or a layer past a gap in the numbering: exit 2 naming the entry,
    with the layout the reader expects, and no program written."""
    rng = np.random.default_rng(9)
    weight = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    for name, extra in (("misspelt.npz", "layers.0.wieght"), ("gap.npz", "layers.2.weight")):
        np.savez(work / name, **{"layers.0.weight": weight, extra: weight})
        run = npugen(work, ["compile", name, "-o", "npz.npu"])
        assert "Traceback" not in run.stderr, run.stderr
        assert run.returncode == 2, run.stderr
        assert f"unknown entries {extra}" in run.stderr
        assert "layers.{i}.weight" in run.stderr
        assert not (work / "npz.npu").exists()

@pytest.mark.parametrize("shape, reason", [
    (BIG, "M=100000 rows exceed the 65535 rows one MATMUL can stream"),
    ("64x100000x100000", "weights need 1250000000 words, weight_depth is 4096"),
])
def test_matmul_random_refused_before_allocating(work, shape, reason):
    """100000³ would allocate 74.5 GiB: refused by the memories' sizes, before that."""
    run = npugen(work, ["matmul", "--random", shape])
    check_refusal(run, 2, reason)


def test_serve_sim_port_in_use(work):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = npugen(work, ["serve-sim", "--port", str(port)])
    check_refusal(run, 2, f"port {port} is in use")


def test_program_missing_library_is_named(work):
    run = npugen(work, ["program", "--board", "icebreaker", "bitstream.bin"], tools="nolib")
    check_refusal(run, 2, "libftdi1.so.2 is missing: sudo apt-get install libftdi1-2")
    assert "plugged in" not in run.stderr


def test_program_no_board_asks_if_plugged_in(work):
    run = npugen(work, ["program", "--board", "icebreaker", "bitstream.bin"], tools="noboard")
    check_refusal(run, 1, "is the board plugged in?")


def test_program_names_the_baud_its_build_was_made_for(work):
    """After loading a bitstream, the hint for npugen run carries the --baud of the build
    (its report.json, as npugen build writes it beside the build folder)."""
    run = npugen(work, ["program", "--board", "ulx3s-85f", "bitstream.bin"], tools="loads")
    assert run.returncode == 0, run.stderr
    assert "--target /dev/ttyUSB1 ..." in run.stdout and "--baud" not in run.stdout
    build = work / "fast" / "build"
    build.mkdir(parents=True)
    (build / "ulx3s_85f.bit").write_bytes(b"\0" * 16)
    (work / "fast" / "report.json").write_text('{"board": "ulx3s-85f", "baud": 3000000}')
    run = npugen(work, ["program", "--board", "ulx3s-85f", "fast/build/ulx3s_85f.bit"],
                 tools="loads")
    assert run.returncode == 0, run.stderr
    assert "--target /dev/ttyUSB1 --baud 3000000 ..." in run.stdout


@pytest.mark.parametrize("model, flag, value, word", [
    # 32 words hold no output tile of the first layer (64): not even a part of it in a stage.
    ("mlp", "--weight-depth", "32", "weight_depth is 32"),
    ("cnn", "--activation-depth", "64", "activation_depth")])
def test_demo_that_does_not_fit(work, model, flag, value, word):
    """A demo network too large for the memories is refused before any training (an
    untrained network of its shapes is compiled first): DoesNotFit's message, exit 2."""
    started = time.monotonic()
    run = npugen(work, ["demo", "--model", model, "--target", "golden", flag, value,
                        "--workdir", "demo"])
    check_refusal(run, 2, word)
    assert time.monotonic() - started < 30, "refused before training"


def test_run_json_counts_the_inferences_run(work):
    """One input of a batch-8 program: cycles per inference are the run's cycles."""
    run = npugen(work, ["run", "p.npu", "--input", "one.npy", "-o", "y.npy", "--json"])
    assert run.returncode == 0, run.stderr
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    assert stats["inferences"] == stats["runs"] == 1 and stats["batch"] == BATCH
    assert stats["cycles"] == stats["cycles_per_run"] == stats["total_cycles"]
    assert stats["cycles_full_batch"] == stats["cycles_per_run"] / BATCH
    assert stats["utilization"] == pytest.approx(stats["utilization_full_batch"] / BATCH)


def test_run_with_the_programs_own_config(work):
    run = npugen(work, ["run", "p.npu", "--input", "x.npy", "-o", "y.npy", "--rows", "8"])
    assert run.returncode == 0, run.stderr
    assert np.load(work / "y.npy").shape == (3, CLASSES)


def test_generate_creates_its_folder(work):
    run = npugen(work, ["generate", "-o", "new/nested", "--rows", "2", "--cols", "2"])
    assert run.returncode == 0, run.stderr
    assert (work / "new" / "nested" / "npu.v").exists()


def test_int8_graph_input_compiles_with_its_dequantize_scale(work):
    """A tf2onnx-style model: int8 input, then DequantizeLinear (scale 0.05, zero point -3)."""
    run = npugen(work, ["compile", "int8.onnx", "-o", "int8.npu", "--json"])
    assert run.returncode == 0, run.stderr
    from npugen.program import Program

    program = Program.load(work / "int8.npu")
    assert program.input.scale == pytest.approx(0.05) and program.input.zero_point == -3


def test_inspect_lists_instructions_once(work):
    run = npugen(work, ["inspect", "p.npu"])
    assert run.returncode == 0, run.stderr
    assert sum(line.startswith("instructions") for line in run.stdout.splitlines()) == 1


def test_device_exists_without_importing_pyserial():
    code = ("import sys, npugen; assert 'serial' not in sys.modules; "
            "from npugen.driver import Device; assert npugen.Device is Device")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- a lost board or run: exit 1 (in process: the failures are raised by a stand-in) -------

@pytest.mark.parametrize("error, status, word", [
    ("DeviceLost", 1, "check failed: the board stopped answering"),
    ("DeviceError", 2, "error: the board stopped answering"),
    ("NpuRunError", 1, "check failed: the board stopped answering"),
])
def test_device_failures_map_to_exit_status(work, monkeypatch, capsys, error, status, word):
    from npugen import driver, hostops, runtime
    from npugen.cli import main

    kind = getattr(hostops if error == "NpuRunError" else driver, error)

    def lost(*args, **kwargs):
        raise kind("the board stopped answering")

    monkeypatch.setattr(runtime, "run", lost)
    assert main(["run", str(work / "p.npu"), "--input", str(work / "x.npy"), "-o",
                 str(work / "y.npy"), "--target", "socket://127.0.0.1:9"]) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0]


def test_outputs_go_to_exactly_the_path_given(work):
    """-o without .npy writes that file, as the command says, not NAME.npy beside it."""
    for argv in (["run", "p.npu", "--input", "x.npy", "-o", "out.bin"],
                 ["matmul", "--random", "4x4x8", "-o", "y.bin"]):
        ran = npugen(work, argv)
        assert ran.returncode == 0, ran.stderr
        written = work / argv[-1]
        assert f"-> {argv[-1]}" in ran.stdout and written.exists()
        assert not written.with_name(written.name + ".npy").exists()
        assert np.load(written).size > 0
