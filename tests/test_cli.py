"""The command line: outputs, --json, and exit status 2 with a clear message on bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import available_simulators
from npugen.cli import main
from npugen.isa import ISA_VERSION


@pytest.fixture
def operands(tmp_path):
    rng = np.random.default_rng(7)
    a = rng.integers(-128, 128, (13, 19)).astype(np.int8)
    w = rng.integers(-128, 128, (19, 11)).astype(np.int8)
    bias = rng.integers(-5000, 5000, 11).astype(np.int32)
    paths = {}
    for name, value in (("a", a), ("w", w), ("bias", bias)):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], value)
    paths["y"] = tmp_path / "y.npy"
    expected = a.astype(np.int64) @ w.astype(np.int64) + bias
    return paths, expected


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_matmul_golden(operands, capsys):
    paths, expected = operands
    status = main(["matmul", "--a", str(paths["a"]), "--w", str(paths["w"]), "--bias",
                   str(paths["bias"]), "-o", str(paths["y"]), "--json", "--rows", "4"])
    assert status == 0
    assert np.array_equal(np.load(paths["y"]), expected)
    record = last_json(capsys)
    assert record["cycles"] > record["ideal_cycles"] == 13 * 19 * 11 / 32
    assert 0 < record["utilization"] < 1 and record["bit_exact"]
    assert record["busy_cycles"] > 0 and record["stall_cycles"] >= 0
    # An NPU with only the cycles counter: the others are absent (null), not zero.
    assert main(["matmul", "--a", str(paths["a"]), "--w", str(paths["w"]), "--json",
                 "--rows", "4", "--activity-counters", "false"]) == 0
    record = last_json(capsys)
    assert record["cycles"] > 0 and record["cycles_match_model"]
    assert record["busy_cycles"] is record["macs"] is record["stall_cycles"] is None


@pytest.mark.parametrize("simulator", available_simulators())
def test_matmul_rtl_through_console_script(operands, simulator):
    paths, expected = operands
    run = subprocess.run(
        [sys.executable, "-m", "npugen", "matmul", "--a", str(paths["a"]), "--w",
         str(paths["w"]), "-o", str(paths["y"]), "--target", "rtl", "--sim", simulator,
         "--json", "--rows", "2", "--cols", "3"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["bit_exact"] and record["cycles_match_model"]
    assert record["target"] == "rtl" and record["simulator"] == simulator
    assert np.array_equal(np.load(paths["y"]), expected - np.load(paths["bias"]))


def test_generate(tmp_path, capsys):
    assert main(["generate", "-o", str(tmp_path), "--rows", "2", "--cols", "3", "--json"]) == 0
    text = (tmp_path / "npu.v").read_text()
    assert "module npu(" in text
    description = json.loads((tmp_path / "npu.json").read_text())
    assert description["config"]["cols"] == 3 and description["isa_version"] == ISA_VERSION
    assert last_json(capsys)["macs_per_cycle"] == 6


@pytest.mark.parametrize("change, message", [
    (lambda p: np.save(p["a"], np.zeros((3, 19), np.float32)), "A must hold integers"),
    (lambda p: np.save(p["a"], np.zeros((3, 18), np.int8)), "A's columns (18) must equal"),
    (lambda p: np.save(p["a"], np.full((3, 19), 300)), "A values must fit int8"),
    (lambda p: np.save(p["bias"], np.zeros(4, np.int32)), "bias must have N=11 values, not 4"),
    (lambda p: p["a"].write_text("not numpy"), "is not a readable .npy array"),
    (lambda p: p["w"].unlink(), "does not exist"),
])
def test_matmul_bad_input(operands, capsys, change, message):
    paths, _ = operands
    change(paths)
    status = main(["matmul", "--a", str(paths["a"]), "--w", str(paths["w"]), "--bias",
                   str(paths["bias"]), "-o", str(paths["y"])])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not paths["y"].exists()


@pytest.mark.parametrize("flags, message", [
    (["--rows", "0"], "rows must be between 1 and 64, not 0"),
    (["--requant-lanes", "3"], "requant_lanes must divide both rows"),
    (["--activation-depth", "16"],
     "activations need 39 words, activation_depth is 16 (23 too many)"),
    (["--instruction-depth", "2"], "instruction_depth is 2"),
    (["--requant-serial-bits", "4"], "requant_serial_bits=4 (a serial requantizer product) "
                                     "has no path back into the accumulators"),
    (["--requant-serial-bits", "32", "--adds", "false"],
     "requant_serial_bits must be 0 (products in DSP blocks) or 1 to 31"),
    (["--weight-banks", "3"], "weight_banks must be 1 or 2, not 3"),
    (["--weight-segments", "3"], "weight_segments must be 1 or a power of two dividing "
                                 "rows"),
    (["--weight-segments", "2", "--weight-banks", "1"],
     "weight_segments = 2 cannot go with weight_banks = 1: set weight_segments = 1"),
    (["--row-broadcast", "true"], "row_broadcast = true (every column takes its row's "
                                  "activation in the same cycle) loads every column at "
                                  "once: set load_skew = false"),
    (["--single-port-activations", "true", "--requant-overlap", "true"],
     "cannot go with requant_overlap = true, whose REQUANT writes beside the feeder's "
     "reads: set requant_overlap = false"),
])
def test_matmul_bad_config(operands, capsys, flags, message):
    paths, _ = operands
    status = main(["matmul", "--a", str(paths["a"]), "--w", str(paths["w"]), "-o",
                   str(paths["y"]), *flags])
    assert status == 2
    assert message in capsys.readouterr().err


def test_bad_toml_config(operands, tmp_path, capsys):
    paths, _ = operands
    config = tmp_path / "bad.toml"
    config.write_text("rows = 'eight'\n")
    status = main(["matmul", "--a", str(paths["a"]), "--w", str(paths["w"]), "-o",
                   str(paths["y"]), "--config", str(config)])
    assert status == 2
    assert "rows must be an integer, not 'eight'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["matmul", "--random", "6x0x3"], "--random dimensions must be at least 1, not 6x0x3"),
    (["matmul", "--rows", "4"], "give --a A.npy and --w W.npy, or --random MxKxN"),
    (["serve-sim", "--port", "70000"], "--port must be between 0 and 65535, not 70000"),
    (["serve-sim", "--board", "nope"], "unknown board 'nope'"),
    (["run", "nothing.npu", "--input", "x.npy", "-o", "y.npy"], "does not exist"),
    (["matmul", "--random", "8x8x8", "--line-buffer-depth", "2"],
     "line_buffer_depth must be 0 or at least 4, not 2"),
    (["generate", "-o", "unused", "--rows", "8", "--cols", "4", "--line-buffer-depth", "16"],
     "line_buffer_depth=16 (the depthwise mode) needs a square array"),
])
def test_more_bad_input(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_primitives_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve-sim", "--primitives", "gowin"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--primitives: invalid choice: 'gowin'" in err and "ecp5" in err and "ice40" in err


def test_malformed_random_shape_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["matmul", "--random", "6x"])
    assert exit_.value.code == 2
    assert "expected MxKxN such as 64x96x80, not '6x'" in capsys.readouterr().err


def test_output_cut_short_by_its_reader_stops_without_a_traceback(tmp_path):
    """`npugen build --list-boards | head -1`: the reader closes the pipe; npugen stops
    with status 1 and no traceback."""
    process = subprocess.Popen([sys.executable, "-m", "npugen", "build", "--list-boards"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               bufsize=0)
    process.stdout.close()
    _, error = process.communicate(timeout=120)
    assert process.returncode == 1 and b"Traceback" not in error, error.decode()


def test_compile_refuses_accumulators_too_narrow_for_the_model(tmp_path, capsys):
    """KWS's sums need 21-bit accumulators: on a 20-bit NPU compile names the layer and
    the width (exit 2) and writes nothing; on a 21-bit one it compiles."""
    from pathlib import Path

    model = str(Path(__file__).parent.parent / "benchmarks" / "models" / "mlperf-tiny"
                / "kws_ref_model.tflite")
    out = tmp_path / "kws.npu"
    flags = ["--rows", "4", "--cols", "4", "--adds", "false", "--max-pooling", "false",
             "--activation-depth", "16384", "--weight-depth", "16384", "--accumulator-depth",
             "1024", "--instruction-depth", "4096", "--param-depth", "512"]
    assert main(["compile", model, "-o", str(out), *flags, "--accumulator-width", "20"]) == 2
    assert ("its sums may reach ±1024000, which needs 21-bit accumulators"
            in capsys.readouterr().err)
    assert not out.exists()
    assert main(["compile", model, "-o", str(out), *flags, "--accumulator-width", "21"]) == 0
    assert out.exists()


def test_a_toml_file_merges_top_level_keys_with_its_npu_table(tmp_path):
    """Top-level keys and an [npu] table both count; a key given both ways, differently,
    is refused by name."""
    from npugen.config import NpuConfig

    both = tmp_path / "both.toml"
    both.write_text("rows = 16\ncols = 16\n[npu]\nrequant_lanes = 4\n")
    config = NpuConfig.from_dict(NpuConfig.toml_values(both))
    assert (config.rows, config.cols, config.requant_lanes) == (16, 16, 4)
    clash = tmp_path / "clash.toml"
    clash.write_text("rows = 16\n[npu]\nrows = 8\n")
    with pytest.raises(ValueError, match="gives rows both at the top level and in its "
                                         "\\[npu\\] table, differently"):
        NpuConfig.toml_values(clash)


def test_an_interrupt_stops_with_one_line_and_status_130(monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) during a command: no traceback, "interrupted", 130."""
    import npugen.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_inspect", interrupted)
    assert cli.main(["inspect", "anything.npu"]) == 130
    assert capsys.readouterr().err == "npugen inspect: interrupted\n"


def test_list_boards_with_json_ends_with_the_boards(capsys):
    assert main(["build", "--list-boards", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = [board["name"] for board in record["boards"]]
    assert "ulx3s-85f" in names and record["boards"][0]["config"]["rows"] >= 1
