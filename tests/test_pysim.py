"""Jobs on Amaranth's own simulator (``simulate(..., simulator="amaranth")``): results
and cycle counters equal NumPy's and the golden model's."""

from __future__ import annotations

import numpy as np
import pytest
from amaranth.sim import Simulator

from npugen.config import NpuConfig
from npugen.hostops import NpuRunError, bus_program, execute
from npugen.hw import Npu
from npugen.job import run_golden
from npugen.matmul import matmul_job, matmul_output
from npugen.sim.pysim import CLOCK_PERIOD_S, AmaranthBus
from npugen.sim.runner import SIMULATORS, build, simulate, simulator_available

SMALL = NpuConfig(rows=2, cols=3, activation_depth=64, weight_depth=64, accumulator_depth=64,
                  instruction_depth=64, param_depth=16)


def test_amaranth_is_a_simulator_and_always_available():
    assert "amaranth" in SIMULATORS
    assert simulator_available("amaranth")


def test_gemm_jobs_match_numpy_and_golden_counters():
    """Two GEMMs in one simulation (the second with bias, on the state the first left):
    outputs, whole golden outputs and every counter agree."""
    rng = np.random.default_rng(11)
    a, w = rng.integers(-128, 128, (7, 5)), rng.integers(-128, 128, (5, 4))
    a2, w2 = rng.integers(-128, 128, (3, 4)), rng.integers(-128, 128, (4, 5))
    bias = rng.integers(-(1 << 20), 1 << 20, 5)
    (job, plan), (job2, plan2) = matmul_job(SMALL, a, w), matmul_job(SMALL, a2, w2, bias)
    results = simulate([job, job2], simulator="amaranth")
    for result, job_, plan_, want in ((results[0], job, plan, a @ w),
                                      (results[1], job2, plan2, a2 @ w2 + bias)):
        golden = run_golden(job_)
        np.testing.assert_array_equal(matmul_output(plan_, result), want)
        np.testing.assert_array_equal(result.outputs["y"], golden.outputs["y"])
        assert result.counters == golden.counters
        assert result.counters.cycles > 0
        assert result.run_seconds is not None and result.run_seconds > 0


def test_jobs_must_share_one_config():
    job, _ = matmul_job(SMALL, np.ones((2, 2), int), np.ones((2, 2), int))
    other, _ = matmul_job(SMALL.replace(cols=2), np.ones((2, 2), int), np.ones((2, 2), int))
    with pytest.raises(ValueError, match="must share one NpuConfig"):
        simulate([job, other], simulator="amaranth")


def test_unknown_simulator_and_amaranth_build_are_refused():
    job, _ = matmul_job(SMALL, np.ones((2, 2), int), np.ones((2, 2), int))
    with pytest.raises(ValueError, match="simulator must be one of verilator, icarus, amaranth, "
                                         "not 'modelsim'"):
        simulate([job], simulator="modelsim")
    with pytest.raises(ValueError, match=r"one of verilator, icarus \(amaranth needs no build\)"):
        build(SMALL, "amaranth")


def test_timeout_raises_npu_run_error():
    """A run longer than the program's timeout stops the simulation with a clear error."""
    rng = np.random.default_rng(12)
    job, _ = matmul_job(SMALL, rng.integers(-128, 128, (8, 6)), rng.integers(-128, 128, (6, 6)))
    assert run_golden(job).counters.cycles > 10
    npu = Npu(SMALL)

    async def testbench(ctx):
        await execute(AmaranthBus(ctx, npu), bus_program(job, timeout_cycles=10))

    sim = Simulator(npu)
    sim.add_clock(CLOCK_PERIOD_S)
    sim.add_testbench(testbench)
    with pytest.raises(NpuRunError, match="did not reach HALT within 10 cycles and was "
                                          "aborted"):
        sim.run()


def test_memories_whose_depth_is_not_a_power_of_two():
    """Depths that are multiples of DEPTH_STEP but not powers of two: a GEMM whose
    activations reach past the power of two below the depth runs as on the golden model."""
    config = SMALL.replace(activation_depth=768, weight_depth=768, accumulator_depth=768)
    rng = np.random.default_rng(5)
    a, w = rng.integers(-128, 128, (700, 2)), rng.integers(-128, 128, (2, 3))
    job, plan = matmul_job(config, a, w)
    [result] = simulate([job], simulator="amaranth")
    golden = run_golden(job)
    np.testing.assert_array_equal(matmul_output(plan, result), a @ w)
    np.testing.assert_array_equal(result.outputs["y"], golden.outputs["y"])
    assert result.counters == golden.counters


def test_a_reset_in_the_middle_of_a_run_does_not_reach_the_next_runs():
    """The PEs, the array's skew, and the requantizer's and accumulate path's data
    registers have no reset (hw/pe.py). A reset while a run streams data through all of
    them, then jobs that read every kind of result (depthwise mode, GEMM, REQUANT, a
    second GEMM on its output): outputs and counters equal the golden model's."""
    from amaranth import ClockDomain, Module

    from npugen.hostops import decode_result
    from npugen.memory_map import Control, Reg, Region, address
    from programs import depthwise_mode_job, layer_chain_job

    config = NpuConfig(rows=6, cols=6, requant_lanes=3, line_buffer_depth=16,
                       requant_overlap=True, activation_depth=2048, weight_depth=2048,
                       accumulator_depth=256, instruction_depth=1024, param_depth=256)
    rng = np.random.default_rng(21)
    interrupted = [layer_chain_job(config, rng, m=40, k=20, n=14, n2=9, zero_point=3,
                                   clamp=(-128, 127)),
                   depthwise_mode_job(config, rng, out_halo=True)[0]]
    after = [depthwise_mode_job(config, rng, out_halo=False)[0],
             layer_chain_job(config, rng, m=9, k=13, n=8, n2=7, zero_point=-5,
                             clamp=(-100, 90))]
    npu = Npu(config)
    top = Module()
    top.domains.sync = domain = ClockDomain("sync")
    top.submodules.npu = npu
    results = []

    async def testbench(ctx):
        bus = AmaranthBus(ctx, npu)
        for stopped, job in zip(interrupted, after, strict=True):
            program = bus_program(stopped)
            await bus.write_many(program.write_addresses, program.write_words)
            await bus.write_many(
                np.array([address(Region.REGISTERS, Reg.START_PC),
                          address(Region.REGISTERS, Reg.CONTROL)], np.uint32),
                np.array([program.start_pc, int(Control.START)], np.uint32))
            await ctx.tick().repeat(run_golden(stopped).counters.cycles // 2)
            assert ctx.get(npu.running)
            ctx.set(domain.rst, 1)
            for _ in range(3):
                await ctx.tick()   # one tick at a time: repeat() raises DomainReset
            ctx.set(domain.rst, 0)
            await ctx.tick()
            assert not ctx.get(npu.running)
            results.append(decode_result(job, *await execute(bus, bus_program(job))))

    sim = Simulator(top)
    sim.add_clock(CLOCK_PERIOD_S)
    sim.add_testbench(testbench)
    sim.run()
    for job, result in zip(after, results, strict=True):
        golden = run_golden(job)
        for key, value in golden.outputs.items():
            np.testing.assert_array_equal(result.outputs[key], value, err_msg=key)
        assert result.counters == golden.counters
