"""The TFLite front end: int8 .tflite models compiled by npugen give the outputs of
LiteRT's reference kernels bit for bit, the four MLPerf Tiny reference models first."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import MLPERF_TINY, available_simulators, litert_reference
from npugen.cli import main
from npugen.compiler import compile_model
from npugen.config import NpuConfig
from npugen.graph import ModelError
from npugen.isa import Opcode, decode_program
from npugen.memory_map import Region
from npugen.mlperf import MODELS as MLPERF_MODELS
from npugen.mlperf import REFERENCE_CONFIG
from npugen.runtime import run
from npugen.schedule import DoesNotFit
from npugen.tflite_import import load_tflite
from npugen.timing import RESCALE_TAIL_CYCLES, TABLE_TAIL_CYCLES

#: Memories large enough for any of the four models on an 8×8 array.
LARGE = REFERENCE_CONFIG


def shaped(**changes) -> NpuConfig:
    """LARGE with ``changes``, its weight memory in a part per row (REFERENCE_CONFIG's
    weight segments) where the rows are a power of two, else in one, the depthwise tap
    row where the rows and line buffers take one, and the rescale tables where the
    array is square and the requantizer beside it."""
    rows = changes.get("rows", LARGE.rows)
    tap_row = rows in (5, 8) and changes.get("line_buffer_depth", 1) > 0
    return LARGE.replace(**{"weight_segments": rows if rows & (rows - 1) == 0 else 1,
                            "depthwise_tap_row": tap_row,
                            "rescale_tables": (rows == changes.get("cols", LARGE.cols)
                                               and changes.get("requant_overlap", True)),
                            **changes})


#: The four MLPerf Tiny models' files by their demo names (kws, resnet, ad, vww).
MODELS = {model.demo: model.file for model in MLPERF_MODELS.values()}


def random_input(path, count: int, seed: int) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_path=str(path)).get_input_details()[0]
    shape = tuple(detail["shape"][1:])
    return np.random.default_rng(seed).integers(-128, 128, size=(count, *shape), dtype=np.int8)


def test_ad_at_batch_1_requantizes_each_layer_once_and_stays_exact():
    """At batch 1 on the reference 8×8 (a weight part per row) each of AD's dense layers
    of several output tiles runs its GEMMs, then one REQUANT over all its tiles (SETREQ
    param_walk), where the cycle model finds it faster: the outputs stay LiteRT's, and
    the run takes fewer cycles than a REQUANT a tile would let it."""
    path = MLPERF_TINY / MODELS["ad"]
    program = compile_model(path, LARGE, batch=1)
    words = next(values for region, _, values in program.segments
                 if region is Region.INSTRUCTIONS)
    walks = [ins for ins in decode_program(words)
             if ins.opcode is Opcode.SETREQ and ins["param_walk"]]
    assert len(walks) >= 8   # the layers of 128 and 640 outputs
    x = random_input(path, 1, seed=11)
    result = run(program, x)
    np.testing.assert_array_equal(result.quantized_output,
                                  litert_reference(path)(x).reshape(len(x), -1))
    assert result.counters.cycles == program.estimated_cycles
    # 4,128 tile-cycles at one K tile a cycle, and per layer at most a GEMM start, the
    # REQUANT and the array's drain; a REQUANT a tile took 6,256.
    assert program.estimated_cycles < 5000


def test_a_batch_whose_tiles_pass_the_accumulators_runs_a_tile_at_a_time():
    """AD on the ULX3S-85F's default: its 640-feature layers have 40 output tiles, and
    at batch 64 they take 2,560 accumulator words of its 512. With the feature-map
    hardware each output tile runs and is requantized in turn, so the compiler picks
    batch 64 (batch 8 when a layer's tiles had to fit at once, utilization 0.297) and the
    outputs stay LiteRT's. Without it, a plain GEMM per layer must hold them all: refused,
    naming the accumulators."""
    from npugen.boards import BOARDS

    config = BOARDS["ulx3s-85f"].default_config
    path = MLPERF_TINY / MODELS["ad"]
    program = compile_model(path, config)
    assert program.batch == 64 and 40 * program.batch > config.accumulator_depth
    assert program.summary()["utilization"] > 0.9
    x = random_input(path, 3, seed=13)
    result = run(program, x)
    np.testing.assert_array_equal(result.quantized_output,
                                  litert_reference(path)(x).reshape(len(x), -1))
    assert result.counters.cycles == program.estimated_cycles * result.runs
    plain = NpuConfig(rows=16, cols=16, feature_maps=False, weight_depth=65536,
                      param_depth=4096, activation_depth=16384, instruction_depth=4096,
                      accumulator_depth=512)
    with pytest.raises(DoesNotFit, match=r"batch 64: accumulators need 2560 words, "
                                         r"accumulator_depth is 512"):
        compile_model(path, plain, batch=64)
    # A batch past even one tile's accumulator words is refused by name too.
    with pytest.raises(DoesNotFit, match=r"batch 1024: .*an output row of 1024 pixels needs "
                                         r"more than the 512 accumulator words"):
        compile_model(path, config, batch=1024)


@pytest.mark.parametrize("name", ["kws", "resnet", "ad",
                                  pytest.param("vww", marks=pytest.mark.slow)])
def test_mlperf_tiny_models_equal_litert_reference(name):
    """Every output of every input equals LiteRT's reference kernels (int8, after the
    host's softmax where the model ends in one)."""
    path = MLPERF_TINY / MODELS[name]
    program = compile_model(path, LARGE)
    x = random_input(path, 2 if name == "vww" else 4, seed=len(name))
    ours = run(program, x).quantized_output
    reference = litert_reference(path)(x).reshape(len(x), -1)
    assert ours.dtype == np.int8
    np.testing.assert_array_equal(ours, reference)


def test_maps_take_no_more_words_than_are_live_at_once():
    """ResNet-8's maps on a 16×8: placed largest first alone they took 4228 activation
    words where 3336 were live at once (its residual branches leave holes); now they take
    what is live at once (3334 since the right halos fold into the next rows' left ones),
    and the outputs in those shared words still equal LiteRT's."""
    path = MLPERF_TINY / MODELS["resnet"]
    config = shaped(rows=16, cols=8, requant_lanes=4, activation_depth=3328,
                           line_buffer_depth=0)
    with pytest.raises(ValueError) as error:
        compile_model(path, config)
    assert ("feature maps need 3334 activation words, activation_depth is 3328"
            in str(error.value)) and "maps of 3334 words are live at once" in str(error.value)
    program = compile_model(path, config.replace(activation_depth=3584))
    x = random_input(path, 2, seed=8)
    np.testing.assert_array_equal(run(program, x).quantized_output,
                                  litert_reference(path)(x).reshape(len(x), -1))


@pytest.mark.parametrize("rows, cols, lanes", [(12, 8, 4), (8, 12, 4), (16, 8, 8), (12, 12, 6),
                                               (4, 4, 1), (16, 16, 8)])
def test_kws_equals_litert_reference_on_every_array_shape(rows, cols, lanes):
    """The channel tiling, halos and shared map words differ by array shape (a 12×8 once
    gave wrong outputs where an 8×8 was exact)."""
    path = MLPERF_TINY / MODELS["kws"]
    config = shaped(rows=rows, cols=cols, requant_lanes=lanes, param_depth=1024,
                           line_buffer_depth=64 if rows == cols else 0)
    x = random_input(path, 2, seed=rows * cols)
    np.testing.assert_array_equal(run(compile_model(path, config), x).quantized_output,
                                  litert_reference(path)(x).reshape(len(x), -1))


def test_overlapped_requants_keep_kws_exact_and_take_fewer_cycles():
    """On the ULX3S-85F's 16×16 with four lanes, requant_overlap runs each output tile's
    REQUANT beside the next tile's GEMM: the outputs stay LiteRT's, the run is shorter."""
    from npugen.boards import board_named

    path = MLPERF_TINY / MODELS["kws"]
    config = board_named("ulx3s-85f").default_config
    x = random_input(path, 2, seed=85)
    results = {overlap: run(compile_model(path, config.replace(requant_overlap=overlap)), x)
               for overlap in (False, True)}
    reference = litert_reference(path)(x).reshape(len(x), -1)
    for result in results.values():
        np.testing.assert_array_equal(result.quantized_output, reference)
    assert results[True].counters.cycles < 0.85 * results[False].counters.cycles


@pytest.mark.parametrize("name, rows, lanes, overlap", [
    ("kws", 12, 4, True), ("kws", 8, 1, True), ("kws", 6, 6, False), ("vww", 12, 4, False),
    ("resnet", 9, 3, True)])
def test_depthwise_mode_keeps_models_exact_and_takes_fewer_cycles(name, rows, lanes, overlap):
    """With line buffers the 3×3 stride-1 depthwise layers run in the depthwise mode (one
    pass on a 12×12 or 9×9, two on an 8×8 or 6×6), the others on diagonal tiles: the
    outputs stay LiteRT's, and the run is never longer (ResNet-8 has no depthwise layer:
    the same program)."""
    path = MLPERF_TINY / MODELS[name]
    config = shaped(rows=rows, cols=rows, requant_lanes=lanes, param_depth=1024,
                           requant_overlap=overlap, line_buffer_depth=0)
    x = random_input(path, 1 if name == "vww" else 2, seed=rows)
    plain = compile_model(path, config)
    lined = compile_model(path, config.replace(line_buffer_depth=64))
    words = next(values for region, _, values in lined.segments
                 if region is Region.INSTRUCTIONS)
    modes = [ins for ins in decode_program(words.ravel())
             if ins.opcode is Opcode.SETWIN and ins["depthwise"]]
    assert bool(modes) == (name != "resnet")
    result = run(lined, x)
    np.testing.assert_array_equal(result.quantized_output,
                                  litert_reference(path)(x).reshape(len(x), -1))
    before = run(plain, x).counters.cycles
    assert result.counters.cycles < before if modes else result.counters.cycles == before


def test_the_tap_row_runs_stride_1_depthwise_layers_at_half_the_array_or_more():
    """On the reference 8×8 the depthwise tap row takes a 3×3 kernel in one pass: KWS's
    depthwise layers and VWW's stride-1 ones on maps of 6×6 or more run at 0.5 of rows ×
    cols or more (0.45 at most in two passes), KWS stays LiteRT's and takes fewer cycles
    than without the tap row."""
    kws = MLPERF_TINY / MODELS["kws"]
    with_row, without = (compile_model(kws, LARGE.replace(depthwise_tap_row=tap))
                         for tap in (True, False))
    x = random_input(kws, 2, seed=9)
    result = run(with_row, x)
    np.testing.assert_array_equal(result.quantized_output,
                                  litert_reference(kws)(x).reshape(len(x), -1))
    assert result.counters.cycles < 0.92 * run(without, x).counters.cycles
    vww = compile_model(MLPERF_TINY / MODELS["vww"], LARGE)
    for program, count in ((with_row, 4), (vww, 8)):
        layers = [layer for layer in program.summary()["layers"]
                  if layer["kind"] == "depthwise (line buffers)" and layer["macs"] >= 40_000]
        assert len(layers) == count
        assert min(layer["utilization"] for layer in layers) >= 0.5


def test_float_input_is_quantized_as_tflite_does():
    """A float input given to an int8 model is quantized with the model's input scale,
    rounding half away from zero as TFLite's QUANTIZE does."""
    path = MLPERF_TINY / MODELS["kws"]
    program = compile_model(path, LARGE)
    scale, zero = program.input.scale, program.input.zero_point
    q = random_input(path, 2, seed=3).astype(np.int64)
    # Values exactly halfway between two steps, both signs, and values past the range.
    x = ((np.clip(q, -127, 126) - zero + 0.5) * np.float32(scale)).astype(np.float32)
    x[:, 0, 0, 0] = 1e6
    x[:, 1, 0, 0] = -1e6
    expected = np.sign(x / np.float32(scale)) * np.floor(np.abs(x / np.float32(scale)) + 0.5)
    from npugen.runtime import quantize_input

    got = quantize_input(program, x)
    want = program.input.to_npu_order(np.clip(expected + zero, -128, 127)).astype(np.int64)
    np.testing.assert_array_equal(got, want)


def test_nhwc_layout_and_per_layer_table():
    program = compile_model(MLPERF_TINY / MODELS["kws"], LARGE)
    assert program.input.shape == (49, 10, 1) and program.input.layout == "hwc"
    assert program.input.dtype == "int8" and program.framework == "tflite"
    assert [op["op"] for op in program.host_ops] == ["softmax"]
    kinds = [layer["kind"] for layer in program.layers]
    assert kinds.count("depthwise (line buffers)") == 4 and kinds[-2:] == ["globalavgpool", "dense"]
    assert sum(layer["cycles"] for layer in program.layers) == program.estimated_cycles


def test_layer_cycles_hold_each_layers_macs_when_layers_overlap(monkeypatch):
    """With ``requant_overlap`` a layer's rows stream beside the last REQUANT of the
    layer before, and the compiler moves the next layer's GEMMs ahead of a depthwise
    layer's REQUANTs (npugen.interleave): a layer's cycles are those in which the array
    streams its rows or waits at its instructions, so no layer's utilization passes 1
    and the rows still add up to the run's cycles (KWS on the ULX3S-85F's 16×16). The
    moved program is faster and computes what the program in order does, bit for bit
    with LiteRT's reference kernels."""
    import npugen.compiler
    from npugen.boards import BOARDS
    from npugen.golden import overlap_requants

    config = BOARDS["ulx3s-85f"].default_config
    assert config.requant_overlap
    path = MLPERF_TINY / MODELS["kws"]
    program = compile_model(path, config)
    assert sum(layer["cycles"] for layer in program.layers) == program.estimated_cycles
    assert max(layer["utilization"] for layer in program.layers) <= 1
    assert max(layer["utilization"] for layer in program.layers) > 0.95
    x = random_input(path, 2, seed=3)
    result = run(program, x)
    np.testing.assert_array_equal(result.quantized_output,
                                  litert_reference(path)(x).reshape(2, -1))
    # Each unit's work per layer: the array's adds up to the golden model's busy
    # counter; on eight lanes for sixteen columns the depthwise layers wait for the
    # requantizer and the 1×1 convolutions keep the array the busier unit.
    summary = program.summary()
    assert summary["array_cycles"] == sum(layer["array_cycles"] for layer in program.layers)
    assert summary["array_cycles"] * result.runs == result.counters.busy_cycles
    assert summary["utilization"] < summary["array_bound_utilization"] <= 1
    for layer in program.layers:
        work = {unit: layer[f"{unit}_cycles"] for unit in ("array", "load", "requant")}
        if layer["kind"].startswith("depthwise"):
            assert max(work, key=work.get) == "requant" and work["requant"] > layer["cycles"]
        elif layer["kind"] == "conv":
            assert max(work, key=work.get) == "array"

    monkeypatch.setattr(npugen.compiler, "interleave", lambda config, program: (
        overlap_requants(config, program), list(range(len(program)))))
    in_order = compile_model(path, config)
    assert program.estimated_cycles < 0.95 * in_order.estimated_cycles
    np.testing.assert_array_equal(run(in_order, x).quantized_output,
                                  run(program, x).quantized_output)


def test_weight_segments_never_slow_kws_on_a_16x16():
    """Loading a tile in four segments gives interleave's greedy moves other timing, and
    guided by it alone KWS on the 16×16 with eight lanes got slower (13,608 → 13,982
    cycles); interleave also tries the moves that whole-tile loads suggest and keeps the
    faster, so segments make no model slower. The result stays exact with LiteRT."""
    from npugen.boards import BOARDS

    config = BOARDS["ulx3s-85f"].default_config.replace(weight_depth=6144)
    path = MLPERF_TINY / MODELS["kws"]
    whole = compile_model(path, config.replace(weight_segments=1))
    parted = compile_model(path, config.replace(weight_segments=4))
    assert parted.estimated_cycles <= whole.estimated_cycles
    x = random_input(path, 2, seed=5)
    np.testing.assert_array_equal(run(parted, x).quantized_output,
                                  litert_reference(path)(x).reshape(2, -1))


def test_cli_compile_and_run_kws(tmp_path, capsys):
    path = MLPERF_TINY / MODELS["kws"]
    x = random_input(path, 3, seed=7)
    np.save(tmp_path / "x.npy", x)
    program = tmp_path / "kws.npu"
    assert main(["compile", str(path), "-o", str(program),
                 "--activation-depth", "4096", "--weight-depth", "8192"]) == 0
    capsys.readouterr()
    assert main(["run", str(program), "--input", str(tmp_path / "x.npy"), "-o",
                 str(tmp_path / "y.npy"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == np.int8 and y.shape == (3, 12)
    np.testing.assert_array_equal(y, litert_reference(path)(x).reshape(3, -1))
    assert report["cycles_per_inference"] > 0 and len(report["layers"]) == 12
    on_npu = [layer for layer in report["layers"] if layer["runs_on"] == "npu"]
    assert [layer["name"] for layer in report["layers"] if layer["runs_on"] == "host"] \
        == ["softmax"] and len(on_npu) == 11
    assert all(layer["cycles"] > 0 for layer in on_npu)
    assert all(layer["array_cycles"] > 0 and layer["load_cycles"] > 0
               and layer["requant_cycles"] > 0 for layer in on_npu)
    assert main(["inspect", str(program), "--json"]) == 0
    text = capsys.readouterr().out
    assert "then on the host: softmax" in text
    inspected = json.loads(text.strip().splitlines()[-1])
    assert inspected["host_ops"] == ["softmax"] and inspected["framework"] == "tflite"
    # Per layer: where it runs, MACs, cycles, utilization; the totals agree with them.
    on_npu = [layer for layer in inspected["layers"] if layer["runs_on"] == "npu"]
    assert [layer["name"] for layer in inspected["layers"] if layer["runs_on"] == "host"] \
        == ["softmax"] and len(on_npu) == 11
    assert all({"name", "kind", "macs", "cycles", "utilization"} <= set(layer)
               for layer in on_npu)
    assert sum(layer["cycles"] for layer in on_npu) == inspected["cycles"]
    config = inspected["config"]
    assert inspected["utilization"] == round(
        sum(layer["macs"] for layer in on_npu)
        / (inspected["cycles_per_inference"] * config["rows"] * config["cols"]), 4)
    # Every layer is named in full (the converter's names share a 13-character prefix).
    assert [layer["name"] for layer in on_npu if f"\n{layer['name']} " not in text] == []


def test_unsupported_and_corrupt_models_are_named(tmp_path):
    data = (MLPERF_TINY / MODELS["kws"]).read_bytes()
    with pytest.raises(ModelError, match="not a TFLite flatbuffer"):
        load_tflite(b"garbage" * 10)
    with pytest.raises(ModelError, match="not a readable TFLite model"):
        load_tflite(data[:1000])
    (tmp_path / "bad.tflite").write_bytes(b"x")
    assert main(["compile", str(tmp_path / "bad.tflite"), "-o", str(tmp_path / "o.npu")]) == 2


def build(ops, *, shape=(1, 12, 12, 4), seed=0, float_io=False) -> bytes:
    """A model of ``ops(builder, x, rng)`` written by tests/tflite_builder.py."""
    from tflite_builder import TfliteBuilder

    rng = np.random.default_rng(seed)
    b = TfliteBuilder(seed=seed)
    x = b.input("input", shape, scale=0.05, zero_point=-3,
                dtype="float32" if float_io else "int8")
    b.output(ops(b, x, rng), dtype="float32" if float_io else "int8")
    return b.finish()


#: Models of every supported operator, each compared with LiteRT's reference kernels.
OPERATOR_MODELS = {
    "conv_same_relu": lambda b, x, r: b.conv2d(x, filters=6, kernel=3, padding="SAME",
                                               activation="RELU", rng=r),
    "conv_valid_stride2_relu6": lambda b, x, r: b.conv2d(
        x, filters=10, kernel=(3, 3), stride=2, padding="VALID", activation="RELU6", rng=r),
    "conv_5x5_same_stride2": lambda b, x, r: b.conv2d(x, filters=8, kernel=5, stride=2,
                                                      padding="SAME", rng=r),
    "conv_strides_2x1": lambda b, x, r: b.conv2d(x, filters=9, kernel=(3, 2), stride=(2, 1),
                                                 padding="SAME", rng=r),
    "depthwise_same": lambda b, x, r: b.depthwise_conv2d(x, kernel=3, padding="SAME",
                                                         activation="RELU6", rng=r),
    "depthwise_multiplier2_stride2": lambda b, x, r: b.depthwise_conv2d(
        x, kernel=3, depth_multiplier=2, stride=2, padding="VALID", rng=r),
    "average_pool_valid": lambda b, x, r: b.average_pool2d(
        b.conv2d(x, filters=12, kernel=1, rng=r), pool=2),
    "average_pool_3x3_stride3": lambda b, x, r: b.average_pool2d(x, pool=3, stride=3),
    "average_pool_same_3x3_stride2": lambda b, x, r: b.average_pool2d(
        x, pool=3, stride=2, padding="SAME"),
    "average_pool_same_4x2_relu": lambda b, x, r: b.average_pool2d(
        b.conv2d(x, filters=12, kernel=1, rng=r), pool=(4, 2), stride=1, padding="SAME",
        activation="RELU"),
    "global_average_pool": lambda b, x, r: b.average_pool2d(
        b.conv2d(x, filters=16, kernel=3, padding="SAME", rng=r), pool=(12, 12)),
    "max_pool_same": lambda b, x, r: b.max_pool2d(x, pool=3, stride=2, padding="SAME"),
    "max_pool_valid_2x3": lambda b, x, r: b.max_pool2d(x, pool=(2, 3), stride=(2, 3)),
    "residual_add_relu": lambda b, x, r: b.add(
        b.conv2d(x, filters=8, kernel=1, rng=r), b.conv2d(x, filters=8, kernel=3, rng=r),
        activation="RELU"),
    "pad_then_conv": lambda b, x, r: b.conv2d(b.pad(x, [[0, 0], [1, 2], [2, 1], [0, 0]]),
                                              filters=5, kernel=3, padding="VALID", rng=r),
    "flatten_fully_connected": lambda b, x, r: b.fully_connected(
        b.reshape(b.conv2d(x, filters=6, kernel=3, stride=2, rng=r), (1, -1)), units=10,
        activation="RELU", rng=r),
    # Three maps of 16 channels after a 3-channel input (OPERATOR_INPUTS): on a 12-row
    # array each spans two tiles, the second with 4 channels, and the third shares the
    # first's words (their lifetimes do not meet).
    "conv_chain_16_channels": lambda b, x, r: b.conv2d(b.conv2d(b.conv2d(
        x, filters=16, kernel=3, padding="SAME", activation="RELU", rng=r),
        filters=16, kernel=3, padding="SAME", activation="RELU", rng=r),
        filters=16, kernel=3, padding="SAME", rng=r),
    # Activations as operators of their own, folded by the graph passes.
    "standalone_relu_after_conv": lambda b, x, r: b.activation(
        b.conv2d(x, filters=7, kernel=3, padding="SAME", rng=r), "RELU"),
    "standalone_relu6_after_add": lambda b, x, r: b.activation(b.add(
        b.conv2d(x, filters=8, kernel=1, rng=r), b.conv2d(x, filters=8, kernel=1, rng=r)),
        "RELU6"),
    "standalone_relu_n1_to_1_after_dense": lambda b, x, r: b.activation(b.fully_connected(
        b.reshape(x, (1, -1)), units=9, rng=r), "RELU_N1_TO_1"),
    # An NCHW model's edges, as converters of PyTorch models write them: the user gives
    # and gets C×H×W maps (OPERATOR_INPUTS).
    "nchw_input_and_output": lambda b, x, r: b.transpose(b.conv2d(
        b.transpose(x, [0, 2, 3, 1]), filters=6, kernel=3, padding="SAME", rng=r),
        [0, 3, 1, 2]),
    "nchw_input_to_dense": lambda b, x, r: b.fully_connected(b.reshape(b.conv2d(
        b.transpose(x, [0, 2, 3, 1]), filters=5, kernel=3, stride=2, rng=r), (1, -1)),
        units=8, rng=r),
    "classifier_softmax": lambda b, x, r: b.softmax(b.fully_connected(
        b.reshape(b.average_pool2d(b.depthwise_conv2d(
            b.conv2d(x, filters=16, kernel=3, stride=2, padding="SAME", activation="RELU",
                     rng=r), kernel=3, padding="SAME", activation="RELU", rng=r),
            pool=(6, 6)), (1, -1)), units=7, rng=r)),
}


#: Input shapes other than build()'s (1, 12, 12, 4).
OPERATOR_INPUTS = {"conv_chain_16_channels": (1, 12, 12, 3),
                   "nchw_input_and_output": (1, 4, 12, 10), "nchw_input_to_dense": (1, 3, 9, 11)}
#: A 12×8 (the ULX3S-45F's array): channel tiles of 12 lanes written 8 at a time.
NON_SQUARE = shaped(rows=12, cols=8, requant_lanes=4, line_buffer_depth=0)


@pytest.mark.parametrize("config", [LARGE, NON_SQUARE], ids=["8x8", "12x8"])
@pytest.mark.parametrize("name", sorted(OPERATOR_MODELS))
def test_operator_models_equal_litert_reference(name, config):
    shape = OPERATOR_INPUTS.get(name, (1, 12, 12, 4))
    data = build(OPERATOR_MODELS[name], shape=shape,
                 seed=sorted(OPERATOR_MODELS).index(name))
    from npugen.compiler import compile_quantized
    from npugen.quantize import quantize_model

    program = compile_quantized(quantize_model(load_tflite(data)), config)
    x = np.random.default_rng(1).integers(-128, 128, size=(3, *shape[1:]), dtype=np.int8)
    reference = litert_reference(data)(x).reshape(3, -1)
    np.testing.assert_array_equal(run(program, x).quantized_output, reference)


def test_mlp_with_float_io_equals_litert_reference():
    """A float graph input (QUANTIZE) and output (DEQUANTIZE) around dense layers: a dense
    chain, several inputs a run."""
    def mlp(b, x, r):
        return b.fully_connected(b.fully_connected(x, units=24, activation="RELU", rng=r),
                                 units=5, rng=r)

    data = build(mlp, shape=(1, 40), seed=4, float_io=True)
    from npugen.compiler import compile_quantized
    from npugen.quantize import quantize_model

    program = compile_quantized(quantize_model(load_tflite(data)), NpuConfig())
    assert program.batch > 1 and program.output.dtype == "float32"
    x = np.random.default_rng(2).normal(0, 2, (9, 40)).astype(np.float32)
    result = run(program, x)
    np.testing.assert_array_equal(result.output, litert_reference(data)(x).reshape(9, -1))


def test_nchw_model_with_float_io_equals_litert_reference():
    """QUANTIZE, TRANSPOSE to NHWC, ..., TRANSPOSE to NCHW, DEQUANTIZE: float C×H×W maps in
    and out."""
    def nchw(b, x, r):
        y = b.conv2d(b.transpose(x, [0, 2, 3, 1]), filters=6, kernel=3, stride=2,
                     padding="SAME", activation="RELU", rng=r)
        return b.transpose(b.max_pool2d(y, pool=2), [0, 3, 1, 2])

    data = build(nchw, shape=(1, 5, 10, 8), seed=6, float_io=True)
    model = load_tflite(data)
    assert (model.input_shape, model.input_layout, model.output_layout) == (
        (5, 10, 8), "chw", "chw")
    from npugen.compiler import compile_quantized
    from npugen.quantize import quantize_model

    program = compile_quantized(quantize_model(model), NpuConfig())
    x = np.random.default_rng(3).normal(0, 2, (2, 5, 10, 8)).astype(np.float32)
    output = run(program, x).output
    assert output.shape == (2, 6, 2, 2)
    np.testing.assert_array_equal(output.reshape(2, -1), litert_reference(data)(x))


def test_unsupported_operator_is_refused_by_index_and_name():
    data = build(lambda b, x, r: b.mean(x, axes=(1, 2)))
    with pytest.raises(ModelError, match=r"unsupported operator.*operator 0 \(MEAN"):
        load_tflite(data)


@pytest.mark.parametrize("ops, message", [
    (lambda b, x, r: b.activation(b.max_pool2d(x, pool=2), "RELU"),
     r"operator 1 \(RELU.*an activation must follow a convolution, a dense layer or an add"),
    (lambda b, x, r: b.activation(b.conv2d(x, filters=4, kernel=1, rng=r), "RELU",
                                  quant=(0.5, 0)),
     r"operator 1 \(RELU.*output quantization differs from its input's"),
    (lambda b, x, r: b.add(b.activation(y := b.conv2d(x, filters=4, kernel=1, rng=r), "RELU"),
                           y),
     r"operator 1 \(RELU.*is also read by"),
])
def test_an_activation_that_cannot_be_folded_is_named(ops, message):
    with pytest.raises(ModelError, match=message):
        load_tflite(build(ops))


@pytest.mark.parametrize("ops, message", [
    (lambda b, x, r: b.conv2d(b.transpose(b.conv2d(x, filters=4, kernel=1, rng=r),
                                          [0, 3, 1, 2]), filters=4, kernel=1, rng=r),
     r"operator 1 \(TRANSPOSE.*changes the order of 'conv_2d.*' from HWC to CHW inside the "
     r"model; npugen takes a layout change only on the model's input or as its last"),
    (lambda b, x, r: b.transpose(x, [0, 1, 3, 2]),
     r"operator 0 \(TRANSPOSE.*transposes the model's input with perm \[0, 1, 3, 2\]"),
])
def test_a_transpose_inside_the_model_is_named(ops, message):
    with pytest.raises(ModelError, match=message):
        load_tflite(build(ops))


def test_a_model_too_large_names_every_memory_it_needs():
    small = NpuConfig(activation_depth=1024, weight_depth=1024, instruction_depth=256)
    with pytest.raises(ValueError) as error:
        compile_model(MLPERF_TINY / MODELS["vww"], small)
    message = str(error.value)
    # The weights run in stages, a convolution's in parts of its output tiles
    # (tests/test_stages.py); a depthwise layer's are not split.
    # 11,715 side by side, 9,307 with its first layer made in place over its input.
    for needed in ("feature maps need 9307 activation words, activation_depth is 1024",
                   "1 made in place",
                   "weights need 2304 words for layer 'model/depthwise_conv2d_12' alone, "
                   "weight_depth is 1024", "most at layer"):
        assert needed in message, message


def _check_on_rtl(data: bytes, config: NpuConfig, x: np.ndarray, simulator) -> None:
    """The TFLite model ``data`` compiled for ``config`` gives on the RTL what it gives on
    the golden model (outputs and counters), and that equals LiteRT's reference kernels."""
    from npugen.compiler import compile_quantized
    from npugen.quantize import quantize_model

    program = compile_quantized(quantize_model(load_tflite(data)), config)
    golden = run(program, x)
    rtl = run(program, x, target="rtl", simulator=simulator)
    np.testing.assert_array_equal(rtl.quantized_output, golden.quantized_output)
    assert rtl.counters == golden.counters
    np.testing.assert_array_equal(golden.quantized_output,
                                  litert_reference(data)(x).reshape(len(x), -1))


@pytest.mark.parametrize("simulator", available_simulators())
def test_tflite_model_on_the_rtl_equals_litert(simulator):
    """A small TFLite classifier with both roundings in one program (convolutions round
    twice, FULLY_CONNECTED once), a residual ADD (its inputs looked up in rescale tables:
    its TABLE dispatched beside the depthwise layer's REQUANT, waiting for it, then beside
    its GEMM), exact average pooling and halos written by the NPU, on a 4×4 NPU's RTL with
    two requantizer lanes beside the array: equal to the golden model (outputs and
    counters) and to LiteRT's reference kernels."""
    def classifier(b, x, r):
        y = b.conv2d(x, filters=8, kernel=3, padding="SAME", activation="RELU", rng=r)
        y = b.add(y, b.depthwise_conv2d(y, kernel=3, padding="SAME", rng=r),
                  activation="RELU")
        y = b.average_pool2d(b.max_pool2d(y, pool=2, stride=2), pool=(3, 3))
        return b.softmax(b.fully_connected(b.reshape(y, (1, -1)), units=6, rng=r))

    x = np.random.default_rng(5).integers(-128, 128, size=(3, 6, 6, 3), dtype=np.int8)
    config = NpuConfig(rows=4, cols=4, requant_lanes=2, requant_overlap=True,
                       rescale_tables=True, activation_depth=1024, weight_depth=1024,
                       accumulator_depth=256, instruction_depth=512, param_depth=256)
    _check_on_rtl(build(classifier, shape=(1, 6, 6, 3), seed=11), config, x, simulator)


def _early_layers(b, x, r):
    """A network's first layers at full resolution: a strided 3×3 convolution over a
    single channel, a 3×3 depthwise and a 1×1 convolution, then a global average and a
    classifier."""
    y = b.conv2d(x, filters=4, kernel=3, stride=2, padding="SAME", activation="RELU", rng=r)
    y = b.depthwise_conv2d(y, kernel=3, padding="SAME", activation="RELU6", rng=r)
    y = b.conv2d(y, filters=4, kernel=1, padding="SAME", activation="RELU", rng=r)
    y = b.average_pool2d(y, pool=(17, 17))
    return b.fully_connected(b.reshape(y, (1, -1)), units=3, rng=r)


@pytest.mark.parametrize("simulator", available_simulators())
def test_an_npu_without_max_pooling_and_adds_runs_what_needs_neither(simulator):
    """NPUs generated with max_pooling and adds false (their logic left out, for the
    UP5K), a serial requantizer product, one weight bank and rows broadcast run KWS's
    kinds of layers (a strided convolution, a depthwise, a 1×1, average pooling, a dense
    layer) on the RTL equal to the golden model (outputs and counters) and to LiteRT; a
    model with a max pooling or an add is refused, naming the layer."""
    from npugen.compiler import compile_quantized
    from npugen.quantize import quantize_model

    config = NpuConfig(rows=4, cols=4, activation_depth=4096, weight_depth=512,
                       accumulator_depth=256, instruction_depth=512, param_depth=64,
                       requant_lanes=2, max_pooling=False, adds=False,
                       requant_serial_bits=4, weight_banks=1, row_broadcast=True,
                       load_skew=False)
    x = np.random.default_rng(6).integers(-128, 128, size=(2, 33, 33, 1), dtype=np.int8)
    _check_on_rtl(build(_early_layers, shape=(1, 33, 33, 1), seed=12), config, x, simulator)

    def pooled(b, x, r):
        y = b.conv2d(x, filters=4, kernel=3, padding="SAME", activation="RELU", rng=r)
        return b.max_pool2d(y, pool=2, stride=2)

    def residual(b, x, r):
        y = b.conv2d(x, filters=4, kernel=3, padding="SAME", activation="RELU", rng=r)
        return b.add(y, b.conv2d(y, filters=4, kernel=1, padding="SAME", rng=r))

    for network, field, kind in ((pooled, "max_pooling", "max pooling"),
                                 (residual, "adds", "an add")):
        model = quantize_model(load_tflite(build(network, shape=(1, 8, 8, 3), seed=13)))
        with pytest.raises(DoesNotFit, match=f"layer '[^']+' is {kind}, but this .* "
                                             f"NPU was generated without .*{field} = false"):
            compile_quantized(model, config)
        compile_quantized(model, config.replace(**{field: True}, requant_serial_bits=0))


#: The MLPerf Tiny models each board's default NPU runs, AD in stages (docs/BOARDS.md
#: says why the others do not fit its block RAM).
BOARD_MODELS = {"icebreaker": {"kws", "ad"}, "ulx3s-12f": {"ad"}, "ulx3s-25f": {"kws", "ad"},
                "ulx3s-45f": {"kws", "resnet", "vww", "ad"},
                "ulx3s-85f": {"kws", "resnet", "vww", "ad"},
                "tang-nano-9k": set(), "orangecrab-25f": {"kws", "ad"}}


@pytest.mark.parametrize("board", BOARD_MODELS)
def test_board_defaults_hold_the_models_docs_say(board, tmp_path, capsys):
    """`npugen compile X.tflite --board NAME` succeeds for the models the board's default
    holds and exits 2 saying why for the others; where it holds one, the
    outputs equal LiteRT's reference kernels."""
    from npugen.boards import BOARDS

    assert set(BOARD_MODELS) == set(BOARDS)
    for name, file in MODELS.items():
        path = MLPERF_TINY / file
        status = main(["compile", str(path), "--board", board, "-o", str(tmp_path / "p.npu")])
        err = capsys.readouterr().err
        if name in BOARD_MODELS[board]:
            assert status == 0, err
            program = compile_model(path, BOARDS[board].default_config)
            x = random_input(path, 1, seed=3)
            np.testing.assert_array_equal(run(program, x).quantized_output,
                                          litert_reference(path)(x).reshape(1, -1))
        else:
            # Too little memory, or hardware the board leaves out (the iCEBreaker's
            # adds, its 22-bit accumulators): the error says which.
            assert status == 2 and err.startswith("npugen compile: error: "), (name, err)
            assert any(why in err for why in ("does not fit", "this NPU was generated",
                                              "NPU was generated without",
                                              "-bit accumulators")), (name, err)


@pytest.mark.parametrize("changes, stages, tables, check", [
    # 512 parameter words hold all three adds' tables; 256 the first add's (all three:
    # two stages).
    ({}, 1, 3, False),
    ({"param_depth": 256}, 1, 1, True),
    # Adds without tables take more instructions: all three by tables, as without them
    # four stages.
    ({"instruction_depth": 1024, "accumulator_depth": 128}, 2, 3, False),
    # All by tables three stages, none four, the first add's two.
    ({"instruction_depth": 1024, "param_depth": 128, "accumulator_depth": 128}, 2, 1, True),
    # Adds without tables need two accumulator words a pixel: they do not fit.
    ({"accumulator_depth": 32}, 5, 3, False),
])
def test_rescale_tables_go_to_the_adds_that_make_the_fewest_stages(changes, stages, tables,
                                                                   check):
    """ResNet-8 on the 45F's default and variants of it: each add's TABLE takes
    parameter words, an add without it more instructions and accumulator words; the
    compiler takes the plan of fewest stages (every run writes every stage over the
    link), on a tie the most tables. Where checked: bit-exact with LiteRT, the golden
    model's counters its estimate."""
    from npugen.boards import BOARDS

    config = BOARDS["ulx3s-45f"].default_config
    assert config.rescale_tables and config.param_depth == 512
    path = MLPERF_TINY / MODELS["resnet"]
    program = compile_model(path, config.replace(**changes))
    instructions = [ins for image in program.images()
                    for region, _, words in image if region is Region.INSTRUCTIONS
                    for ins in decode_program(words.ravel())]
    found = sum(ins.opcode is Opcode.TABLE for ins in instructions)
    assert (len(program.images()), found) == (stages, tables)
    # The layer table's tables column: each TABLE's load and every lookup, on the adds
    # that use them (the first ones), though a TABLE runs beside an earlier layer.
    table = program.config.table_load_cycles + TABLE_TAIL_CYCLES
    adds = [layer["table_cycles"] for layer in program.layers if layer["kind"] == "add"]
    assert [cycles > table for cycles in adds] == [True] * tables + [False] * (3 - tables)
    assert all(layer["table_cycles"] == 0 for layer in program.layers
               if layer["kind"] != "add")
    work = program.unit_work()
    assert work["table_cycles"] == found * table + sum(
        ins["count"] + RESCALE_TAIL_CYCLES for ins in instructions
        if ins.opcode is Opcode.RESCALE)
    assert program.unit_keys()[-1] == "table_cycles"
    assert "TABLE loads and lookups" in program.describe()
    if changes == {}:
        without = compile_model(path, config.replace(rescale_tables=False))
        assert program.estimated_cycles < without.estimated_cycles
        assert "table_cycles" not in without.unit_work()
        assert "TABLE loads and lookups" not in without.describe()
    if check:
        x = random_input(path, 1, seed=5)
        result = run(program, x)
        np.testing.assert_array_equal(result.quantized_output,
                                      litert_reference(path)(x).reshape(1, -1))
        assert result.counters.cycles == program.estimated_cycles


IN_PLACE_CONFIG = NpuConfig(rows=4, cols=4, activation_depth=512, weight_depth=512,
                            accumulator_depth=256, instruction_depth=512, param_depth=64,
                            requant_overlap=True, line_buffer_depth=32)


@pytest.mark.parametrize("simulator", available_simulators())
def test_maps_made_in_place_run_bit_exact(simulator):
    """With 512 activation words, which its maps laid side by side exceed (the input by
    im2col 867 words, then 361 for the first map), the first convolution takes its input
    in phases and the three layers write their outputs over their inputs. On the RTL the
    program equals the golden model (outputs and counters), and both equal LiteRT's
    reference kernels and the program with room to spare."""
    from npugen.compiler import compile_quantized
    from npugen.quantize import quantize_model

    data = build(_early_layers, shape=(1, 34, 34, 1), seed=21)
    model = quantize_model(load_tflite(data))
    spacious = compile_quantized(model, IN_PLACE_CONFIG.replace(activation_depth=4096))
    program = compile_quantized(model, IN_PLACE_CONFIG)
    assert [layer["kind"] for layer in spacious.layers[:3]] == [
        "conv (im2col input)", "depthwise (line buffers)", "conv"]
    assert [layer["kind"] for layer in program.layers[:3]] == [
        "conv (input in phases), in place", "depthwise (line buffers), in place",
        "conv, in place"]
    x = np.random.default_rng(8).integers(-128, 128, size=(3, 34, 34, 1), dtype=np.int8)
    golden = run(program, x)
    np.testing.assert_array_equal(golden.quantized_output, run(spacious, x).quantized_output)
    np.testing.assert_array_equal(golden.quantized_output,
                                  litert_reference(data)(x).reshape(3, -1))
    rtl = run(program, x, target="rtl", simulator=simulator)
    np.testing.assert_array_equal(rtl.quantized_output, golden.quantized_output)
    assert rtl.counters == golden.counters


def test_vww_runs_on_the_85f_default_with_maps_in_place():
    """VWW's maps take 7,107 words side by side, the 85F's default has 3,584: its input
    in phases and its first three layers in place fit them, and the outputs equal
    LiteRT's reference kernels."""
    from npugen.boards import BOARDS

    path = MLPERF_TINY / MODELS["vww"]
    program = compile_model(path, BOARDS["ulx3s-85f"].default_config)
    assert [layer["kind"] for layer in program.layers[:3]] == [
        "conv (input in phases), in place", "depthwise (line buffers), in place",
        "conv, in place"]
    x = random_input(path, 2, seed=4)
    np.testing.assert_array_equal(run(program, x).quantized_output,
                                  litert_reference(path)(x).reshape(2, -1))


def test_an_output_that_would_overwrite_input_still_read_is_refused(monkeypatch):
    """The compiler checks each layer made in place where it put it: with no gap below
    its input, the first convolution's REQUANTs would write words its next rows still
    read, and the model is refused rather than run wrong."""
    import npugen.compiler
    from npugen.compiler import compile_quantized
    from npugen.quantize import quantize_model
    from npugen.schedule import DoesNotFit

    model = quantize_model(load_tflite(build(_early_layers, shape=(1, 34, 34, 1), seed=21)))
    monkeypatch.setattr(npugen.compiler, "in_place_gap", lambda *args: 0)
    with pytest.raises(DoesNotFit, match=r"layer 'conv_2d_3' cannot write its output over "
                                         r"its input: instruction \d+ \(REQUANT\) writes "
                                         r"word \d+, which the MATMUL of instruction \d+ "
                                         r"still reads"):
        compile_quantized(model, IN_PLACE_CONFIG)


def test_a_model_short_of_words_names_the_least_it_found():
    """With 3,072 words VWW does not fit the 85F's array even with its maps in place, and
    the message names the fewest words any placement tried took (four layers in place),
    not those of a placement it discarded."""
    from npugen.boards import BOARDS

    config = BOARDS["ulx3s-85f"].default_config.replace(activation_depth=3072)
    with pytest.raises(ValueError, match="with its input in phases, its feature maps need "
                                         "3078 activation words, activation_depth is 3072 "
                                         r"\(.*4 made in place\)"):
        compile_model(MLPERF_TINY / MODELS["vww"], config)


def test_accumulators_narrower_than_32_bits_take_only_models_whose_sums_fit():
    """TFLite sums in 32 bits. On an NPU with narrower accumulators a model compiles only
    if every layer's sums provably fit them (128·Σ|w| + |bias| per channel), and then
    runs bit-exact with LiteRT; otherwise the layer is named with its reach and the width
    to ask for, and an add (inputs scaled by 2**20) needs 32 bits."""
    from npugen.compiler import compile_quantized
    from npugen.quantize import quantize_model

    def small(b, x, r):
        y = b.conv2d(x, filters=4, kernel=3, padding="SAME", activation="RELU", rng=r)
        y = b.average_pool2d(y, pool=(2, 2))
        return b.fully_connected(b.reshape(y, (1, -1)), units=3, rng=r)

    data = build(small, shape=(1, 8, 8, 3), seed=21)
    model = quantize_model(load_tflite(data))
    config = LARGE.replace(accumulator_width=24)
    x = np.random.default_rng(3).integers(-128, 128, size=(4, 8, 8, 3), dtype=np.int8)
    program = compile_quantized(model, config)
    np.testing.assert_array_equal(run(program, x).quantized_output,
                                  litert_reference(data)(x).reshape(len(x), -1))
    with pytest.raises(DoesNotFit, match=r"layer '[^']+': its sums may reach ±\d+, which needs "
                                         r"\d+-bit accumulators .*; this NPU's are 18-bit: "
                                         r"generate it with accumulator_width = \d+ or more"):
        compile_quantized(model, config.replace(accumulator_width=18))

    def residual(b, x, r):
        y = b.conv2d(x, filters=4, kernel=1, padding="SAME", rng=r)
        return b.add(y, b.conv2d(y, filters=4, kernel=1, padding="SAME", rng=r))

    with pytest.raises(DoesNotFit, match="is an add, whose inputs pass the accumulators "
                                         "scaled by 2\\*\\*20: it needs 32-bit"):
        compile_quantized(quantize_model(load_tflite(build(residual, shape=(1, 4, 4, 3),
                                                           seed=22))), config)


def test_the_ad_demo_compiles_no_larger_a_batch_than_it_runs(tmp_path, capsys):
    """`npugen demo --model ad` runs four inputs: on the reference 8×8 AD would compile
    at batch 64, and four inputs in a run of 64 would report a sixteenth of the array's
    work; the demo compiles for batch 4 instead, and the outputs are LiteRT's."""
    from npugen.demo import run_mlperf_demo
    from npugen.program import Program

    record = run_mlperf_demo("ad", target="golden", workdir=tmp_path)
    assert record["equal_to_litert_reference"] is True
    assert record["inputs"] == 4 and record["utilization"] > 0.9
    assert Program.load(tmp_path / "ad.npu").batch == 4
