"""Targets: the golden model, the RTL and a device behind one protocol (load, execute,
execute_many), opened by name in one place, and the runtime's one loop over them."""

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import available_simulators
from npugen import GoldenTarget, NpuConfig, RtlTarget, Target, open_target, run
from npugen.compiler import compile_model
from npugen.driver import Device
from npugen.importers import load_onnx
from npugen.job import Job, run_golden
from npugen.runtime import program_job, quantize_input
from npugen.sim import runner
from npugen.target import ConfigMismatch
from npugen.train import digits, mlp_to_onnx

CONFIG = NpuConfig(rows=4, cols=4, activation_depth=1024, weight_depth=2048,
                   accumulator_depth=512, instruction_depth=1024, param_depth=64)


@pytest.fixture(scope="module")
def program():
    return mlp_program(CONFIG)


def mlp_program(config: NpuConfig):
    """A 64-32-10 MLP with seeded random weights, batch 8, for ``config``."""
    rng = np.random.default_rng(3)
    sizes = (64, 32, 10)
    shapes = list(zip(sizes, sizes[1:], strict=False))
    weights = SimpleNamespace(coefs_=[rng.standard_normal(shape) / 8 for shape in shapes],
                              intercepts_=[rng.standard_normal(shape[1]) / 8
                                           for shape in shapes])
    model = load_onnx(mlp_to_onnx(weights, "/dev/null"))
    return compile_model(model, config, calibration=digits()[0][:64], batch=8)


@pytest.fixture(scope="module")
def x():
    return digits()[1][:43]   # five full runs of 8 and a last one of 3


def assert_same(a, b):
    assert np.array_equal(a.quantized_output, b.quantized_output)
    assert np.array_equal(a.output, b.output)
    assert a.counters == b.counters and a.runs == b.runs


def test_golden_target_equals_golden_by_name(program, x):
    target = GoldenTarget(program.config)
    target.load(program)
    assert_same(run(program, x, target=target), run(program, x, target="golden"))


def test_golden_runs_as_fresh_models_running_whole_jobs_did(program, x):
    """The program loaded once on one model gives what a fresh model per run, each loaded
    with the whole image, gave."""
    q = quantize_input(program, x)
    fresh = [run_golden(program_job(program, q[i:i + program.batch]))
             for i in range(0, len(q), program.batch)]
    result = run(program, x, target="golden")
    assert result.counters.cycles == sum(r.counters.cycles for r in fresh)
    target = GoldenTarget(program.config)
    target.load(program)
    held = target.execute_many([program_job(program, q[i:i + program.batch],
                                            load_program=False)
                                for i in range(0, len(q), program.batch)])
    for one, other in zip(fresh, held, strict=True):
        assert np.array_equal(one.outputs["output"], other.outputs["output"])
        assert one.counters == other.counters


def test_golden_target_refuses_another_config(program):
    other = GoldenTarget(CONFIG.replace(cols=8))
    with pytest.raises(ConfigMismatch, match="cols: program 4, NPU 8"):
        other.load(program)
    job = program_job(program, np.zeros((1, 64), np.int64))
    with pytest.raises(ConfigMismatch, match="cols: job 4, NPU 8"):
        other.execute(job)


class OnlyExecute:
    def execute(self, job):
        return run_golden(job)


class Delegating:
    """A Target by its methods alone, not a subclass: counts the calls."""

    def __init__(self, config):
        self.inner = GoldenTarget(config)
        self.calls = []

    def load(self, program):
        self.calls.append("load")
        self.inner.load(program)

    def execute(self, job):
        self.calls.append("execute")
        return self.inner.execute(job)

    def execute_many(self, jobs):
        self.calls.append("execute_many")
        return self.inner.execute_many(jobs)


@pytest.mark.parametrize("target, missing", [
    (object(), "load, execute, execute_many"), (OnlyExecute(), "load, execute_many"),
    (42, "load, execute, execute_many")])
def test_a_target_without_the_protocol_is_refused(program, x, target, missing):
    assert not isinstance(target, Target)
    with pytest.raises(TypeError, match=f"a Target .*not an object of type "
                                        f"{type(target).__name__}, which has no {missing}"):
        run(program, x, target=target)


def test_a_target_by_its_methods_alone(program, x):
    target = Delegating(program.config)
    assert isinstance(target, Target)
    target.load(program)
    assert_same(run(program, x, target=target), run(program, x))
    assert target.calls == ["load", "execute_many"]


def test_every_target_is_a_target():
    assert issubclass(GoldenTarget, Target) and issubclass(RtlTarget, Target)
    assert issubclass(Device, Target)


def test_open_target_by_name():
    with open_target("golden", CONFIG) as golden:
        assert isinstance(golden, GoldenTarget) and golden.config == CONFIG
    with open_target("rtl", CONFIG, simulator="icarus") as rtl:
        assert isinstance(rtl, RtlTarget) and rtl.simulator == "icarus"
    with open_target("loop://", CONFIG) as device:
        assert isinstance(device, Device) and device.url == "loop://"
    assert not device._port.is_open
    with pytest.raises(ValueError, match="target 'nowhere' is not golden, rtl, sim or a "
                                         "device URL"):
        with open_target("nowhere", CONFIG):
            pass
    with pytest.raises(ValueError, match="simulator must be one of verilator, icarus, "
                                         "amaranth, not 'modelsim'"):
        RtlTarget(CONFIG, simulator="modelsim")


def fake_simulate(calls):
    """simulate() as a fresh golden model per call (a new simulator process: nothing of
    the previous one's memories), each call's job lists recorded."""
    def simulate(jobs, *, simulator, build_root=None, primitives=None):
        calls.append((len(jobs), simulator, len(jobs[0].writes)))
        npu = GoldenTarget(jobs[0].config).npu
        return [run_golden(job, npu) for job in jobs]
    return simulate


def input_writes(program) -> int:
    """The writes of a job that carries inputs only."""
    return len(program_job(program, np.zeros((1, 64), np.int64), load_program=False).writes)


def test_rtl_target_runs_a_few_jobs_per_simulation(program, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "simulate", fake_simulate(calls))
    x = digits()[1][:8 * 20]
    progress = []
    result = run(program, x, target="rtl", simulator="icarus",
                 progress=lambda done, total: progress.append((done, total)))
    assert_same(result, run(program, x, target="golden"))
    # 20 runs in 7 simulations of at most 3: the program's image goes with each one's
    # first job, and the progress moves as each ends.
    first = len(program.segments) + input_writes(program)
    assert calls == [(3, "icarus", first)] * 6 + [(2, "icarus", first)]
    assert progress == [(done, 20) for done in range(1, 21)]


def test_rtl_target_simulates_one_job_alone(program, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "simulate", fake_simulate(calls))
    target = RtlTarget(program.config)
    target.load(program)
    rows = np.arange(8 * 64).reshape(8, 64) % 256 - 128
    result = target.execute(program_job(program, rows, load_program=False))
    assert np.array_equal(result.outputs["output"],
                          run_golden(program_job(program, rows)).outputs["output"])
    assert calls == [(1, "verilator", len(program.segments) + input_writes(program))]
    assert list(target.execute_many([])) == []
    with pytest.raises(ConfigMismatch, match="rows: job 8, NPU 4"):
        target.execute(Job(CONFIG.replace(rows=8)))


@pytest.mark.parametrize("simulator", available_simulators())
def test_rtl_target_holds_the_program_across_simulations(program, x, simulator):
    """Loaded once, run in three simulations: outputs and counters equal the golden
    model's."""
    target = RtlTarget(program.config, simulator=simulator)
    target.SIMULATIONS = 3
    target.load(program)
    assert_same(run(program, x, target=target), run(program, x, target="golden"))


def test_a_target_holding_another_program_is_refused(program, x):
    """A Target loaded with one program is not run with another's inputs and layouts: its
    outputs would be the other program's, with exit 0. A copy of the loaded program is
    the same program."""
    import copy

    rng = np.random.default_rng(11)
    shapes = [(64, 16), (16, 10)]
    weights = SimpleNamespace(coefs_=[rng.standard_normal(shape) / 8 for shape in shapes],
                              intercepts_=[rng.standard_normal(shape[1]) / 8
                                           for shape in shapes])
    other = compile_model(load_onnx(mlp_to_onnx(weights, "/dev/null")), CONFIG,
                          calibration=digits()[0][:64], batch=8)
    target = GoldenTarget(program.config)
    target.load(other)
    with pytest.raises(ValueError, match="holds another program"):
        run(program, x, target=target)
    target.load(program)
    assert_same(run(copy.deepcopy(program), x, target=target), run(program, x, target="golden"))


def test_a_serial_port_opens_at_the_baud_given():
    """--baud reaches the serial port: a pseudo-terminal's line speed, as the kernel holds
    it, is the rate given (the driver's 115,200 without one)."""
    import os
    import termios

    controller, port = os.openpty()
    try:
        path = os.ttyname(port)
        with open_target(path, CONFIG, baud=3_000_000) as device:
            assert isinstance(device, Device)
            assert termios.tcgetattr(port)[4:6] == [termios.B3000000] * 2
        with open_target(path, CONFIG):
            assert termios.tcgetattr(port)[4:6] == [termios.B115200] * 2
    finally:
        os.close(port)
        os.close(controller)


@pytest.mark.parametrize("target, why", [
    ("golden", "the golden model has no link"), ("sim", "virtual board's UART"),
    ("rtl", "host port"), ("socket://127.0.0.1:9", "a TCP socket carries bytes")])
def test_a_baud_for_a_target_without_one_is_refused(program, x, target, why):
    with pytest.raises(ValueError, match=f"a baud rate \\(9600\\) sets a serial port's "
                                         f"speed, and target '{target}' has none.*{why}"):
        run(program, x, target=target, baud=9600)
    with pytest.raises(ValueError, match="baud must be a positive number .* not -1"):
        run(program, x, target="/dev/ttyUSB9", baud=-1)
