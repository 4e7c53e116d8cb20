"""Programs in stages: a model whose weights (or parameters, or instructions) the NPU
cannot hold at once runs as stages of consecutive layers, each an NPU run after the host
writes its image, the activations kept on the NPU between them; bit-exact with the model
compiled whole, and with LiteRT's reference kernels."""

import struct

import numpy as np
import pytest
from test_targets import assert_same, fake_simulate, mlp_program

from conftest import MLPERF_TINY, available_simulators, litert_reference
from npugen import GoldenTarget, NpuConfig, RtlTarget, run
from npugen.boards import BOARDS
from npugen.compiler import compile_model
from npugen.driver import Device, DeviceLost
from npugen.mlperf import MODELS
from npugen.program import Program
from npugen.protocol import START_FORMAT, Command
from npugen.runtime import program_job, program_jobs, quantize_input
from npugen.sim import runner
from npugen.train import digits

WHOLE = NpuConfig(rows=4, cols=4, activation_depth=1024, weight_depth=2048,
                  accumulator_depth=512, instruction_depth=1024, param_depth=64)
#: The first layer's weights (64→32: 16 K tiles × 8 N tiles × 4 rows) fill it.
STAGED = WHOLE.replace(weight_depth=512)


def mlp(config: NpuConfig):
    """The 64-32-10 MLP of tests/test_targets.py, batch 8, for ``config``."""
    return mlp_program(config)


@pytest.fixture(scope="module")
def staged():
    return mlp(STAGED)


@pytest.fixture(scope="module")
def x():
    return digits()[1][:20]   # two full runs of 8 and a last one of 4


def test_a_model_past_the_weight_memory_runs_in_stages(staged, x):
    whole = mlp(WHOLE)
    assert not whole.stages and len(staged.stages) == 2
    assert [layer["stages"] for layer in staged.layers] == [[0], [1]]
    assert staged.segments is staged.stages[0]
    assert staged.memory_words()["weights"] == 512
    on_staged, on_whole = run(staged, x), run(whole, x)
    assert np.array_equal(on_staged.quantized_output, on_whole.quantized_output)
    # Each run starts the NPU once per stage; the cycle model counts both.
    assert on_staged.runs == 3
    assert on_staged.counters.cycles == staged.estimated_cycles * 3
    assert sum(layer["cycles"] for layer in staged.layers) == staged.estimated_cycles
    summary = staged.summary()
    words = summary["stage_words_per_run"]
    assert summary["stages"] == 2 and words == staged.stage_words_per_run() > 512
    assert summary["stage_upload_bytes_per_run"] > 4 * words
    assert "runs in 2 stages" in staged.describe()
    assert "stage 1: " in staged.describe()


def test_each_run_writes_every_stage_image(staged, x):
    q = quantize_input(staged, x[:8])
    jobs = program_jobs(staged, q)
    assert [job.follows for job in jobs] == [False, True]
    assert not jobs[0].reads and "output" in jobs[1].reads
    for job, image in zip(jobs, staged.stages, strict=True):
        assert [(region, entry) for region, entry, _ in image] == [
            (region, entry) for region, entry, _ in job.writes[:len(image)]]
    with pytest.raises(ValueError, match="runs in 2 stages, a job each: use program_jobs"):
        program_job(staged, q)


def test_a_layer_too_large_for_a_stage_runs_in_parts_of_its_output_tiles(x):
    """fc0's eight output tiles (64 weight words each) in two stages of four."""
    parted = mlp(STAGED.replace(weight_depth=256))
    assert len(parted.stages) == 3
    assert [layer["stages"] for layer in parted.layers] == [[0, 1], [2]]
    assert "stage 1: fc0" in parted.describe()
    assert np.array_equal(run(parted, x).quantized_output, run(mlp(WHOLE), x).quantized_output)
    assert sum(layer["cycles"] for layer in parted.layers) == parted.estimated_cycles


def test_a_layer_of_which_one_output_tile_does_not_fit_is_named_once():
    with pytest.raises(ValueError) as error:
        mlp(STAGED.replace(weight_depth=32))
    message = str(error.value)
    assert message.count("weights need 64 words for 1 output tile of layer 'fc0' alone, "
                         "weight_depth is 32") == 1, message


def test_without_the_feature_map_hardware_a_layer_is_not_split():
    with pytest.raises(ValueError, match=r"weights need 512 words for layer 'fc0' alone, "
                                         r"weight_depth is 256"):
        mlp(STAGED.replace(weight_depth=256, feature_maps=False, requant_overlap=False))


@pytest.mark.parametrize("model, board, changes", [
    ("ad", "ulx3s-85f", {}),                       # four stages on the 85F's default
    # Three, with room for its maps (the 85F's default has 3,584 activation words).
    ("vww", "ulx3s-85f", {"activation_depth": 7168}),
    ("ad", "ulx3s-25f", {}),                       # 640×128 layers in parts of 8 tiles
    ("kws", "ulx3s-85f", {"weight_depth": 512}),   # depthwise layers and halos across stages
])
def test_staged_mlperf_models_equal_litert(model, board, changes):
    config = BOARDS[board].default_config.replace(**changes)
    path = MLPERF_TINY / MODELS[model].file
    program = compile_model(path, config)
    assert len(program.stages) >= 3
    x = np.random.default_rng(5).integers(-128, 128, (program.batch + 1, *program.input.shape),
                                          dtype=np.int8)
    result = run(program, x)
    assert np.array_equal(result.quantized_output, litert_reference(path)(x))
    assert result.counters.cycles == program.estimated_cycles * result.runs


def test_the_program_file_keeps_the_stages(staged, tmp_path):
    staged.save(tmp_path / "staged.npu")
    again = Program.load(tmp_path / "staged.npu")
    assert again.to_bytes() == staged.to_bytes()
    assert len(again.stages) == 2 and again.segments is again.stages[0]
    for one, other in zip(again.stages, staged.stages, strict=True):
        for (ra, ea, va), (rb, eb, vb) in zip(one, other, strict=True):
            assert ra == rb and ea == eb and np.array_equal(va, vb)


def test_a_golden_target_runs_a_staged_program_it_holds(staged, x):
    target = GoldenTarget(staged.config)
    target.load(staged)
    assert_same(run(staged, x, target=target), run(staged, x))


def test_rtl_target_keeps_a_runs_stages_in_one_simulation(staged, x, monkeypatch):
    """Six runs of two stages in at most four simulations: never a stage without the one
    before it (a fresh simulator has none of its activations)."""
    calls = []
    monkeypatch.setattr(runner, "simulate", fake_simulate(calls))
    target = RtlTarget(staged.config, simulator="icarus")
    target.SIMULATIONS = 4
    target.load(staged)
    x = digits()[1][:8 * 6]
    assert_same(run(staged, x, target=target), run(staged, x))
    assert [jobs for jobs, _, _ in calls] == [4, 4, 4]


@pytest.mark.slow
@pytest.mark.parametrize("simulator", available_simulators())
def test_a_staged_program_on_the_rtl(staged, x, simulator):
    assert_same(run(staged, x, target="rtl", simulator=simulator), run(staged, x))


@pytest.mark.slow
def test_a_staged_program_on_the_virtual_board(staged, x):
    """Through the UART: the outputs and counters of the golden model; a run of another
    host between two stages of a run is caught, not read past."""
    with Device.open("sim", config=staged.config) as device:
        device.load(staged)
        assert_same(run(staged, x, target=device), run(staged, x))
        first, second = program_jobs(staged, quantize_input(staged, x[:8]))
        device.execute(first)
        # Another host's run: a START with a token the driver did not choose.
        other = device._run_token % 200 + 17
        device.request(Command.START, struct.pack(START_FORMAT, 0, other))
        with pytest.raises(DeviceLost, match=f"another run \\(token {other}\\) came between "
                                             f"two stages"):
            device.execute(second)


def test_compile_and_run_on_the_command_line(tmp_path, capsys):
    """`npugen compile ad01_int8.tflite --board ulx3s-85f`, then `npugen run --json`:
    LiteRT's outputs, and the stages said."""
    import json

    from npugen.cli import main

    path = MLPERF_TINY / MODELS["ad"].file
    assert main(["compile", str(path), "--board", "ulx3s-85f", "-o",
                 str(tmp_path / "ad.npu")]) == 0
    assert "runs in 4 stages" in capsys.readouterr().out
    x = np.random.default_rng(9).integers(-128, 128, (3, 640), dtype=np.int8)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(tmp_path / "ad.npu"), "--input", str(tmp_path / "x.npy"),
                 "-o", str(tmp_path / "y.npy"), "--json"]) == 0
    out = capsys.readouterr().out
    assert "4 stages a run" in out
    report = json.loads(out[out.index("{"):])
    assert report["stages"] == 4 and report["stage_words_per_run"] > 5120 * 4 * 3
    assert [layer["stages"] for layer in report["layers"]][0] == [0]
    assert np.array_equal(np.load(tmp_path / "y.npy"), litert_reference(path)(x))
