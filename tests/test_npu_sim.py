"""The whole NPU in cocotb (Verilator and Icarus) against the golden model, bit for bit
and cycle for cycle: random and edge-shape GEMMs, requantization, chained layers,
accumulator wrap-around, over several configs."""

import numpy as np
import pytest

from conftest import available_simulators
from npugen.config import NpuConfig
from npugen.hw.dsp import ICE40_MAC_STANDIN
from npugen.hw.implementation import Implementation
from npugen.isa import assemble, encode_program
from npugen.job import run_golden
from npugen.matmul import matmul_output
from npugen.sim.runner import build, build_folder, simulate
from programs import (
    GUARD_VALUE,
    back_to_back_accumulate_job,
    depthwise_mode_job,
    depthwise_pointwise_job,
    feature_map_job,
    gemm_jobs,
    layer_chain_job,
    param_walk_job,
    rounding_job,
    rounding_job_words,
    walk_change_job,
    weight_readback_job,
    weight_reload_job,
    wrap_job,
)

SMALL = dict(activation_depth=1024, weight_depth=1024, accumulator_depth=512,
             instruction_depth=512, param_depth=64)

CONFIGS = {
    "1x1": NpuConfig(rows=1, cols=1, **SMALL),
    "2x3": NpuConfig(rows=2, cols=3, **SMALL),
    "4x4": NpuConfig(rows=4, cols=4, requant_lanes=2, **SMALL),
    "4x4-single-rounding": NpuConfig(rows=4, cols=4, rounding="single", **SMALL),
    # The iCEBreaker's shape: four rows, two columns (one SB_MAC16 per row), one lane,
    # double rounding only.
    "4x2-no-feature-maps": NpuConfig(rows=4, cols=2, feature_maps=False, requant_lanes=1,
                                     rounding="double", **SMALL),
    "4x8": NpuConfig(rows=4, cols=8, requant_lanes=4, **SMALL),
    "8x4": NpuConfig(rows=8, cols=4, **SMALL),
    "8x8": NpuConfig(rows=8, cols=8, requant_lanes=8, **SMALL),
    # Without the load skew (the 85F's default): a reload waits for the last column.
    "4x8-unskewed": NpuConfig(rows=4, cols=8, requant_lanes=4, load_skew=False, **SMALL),
    # The weight memory in parts: a tile loads in two cycles (four segments of two rows),
    # and with the unskewed loads in one (a segment per row).
    "8x4-segments": NpuConfig(rows=8, cols=4, weight_segments=4, **SMALL),
    "4x8-unskewed-segments": NpuConfig(rows=4, cols=8, requant_lanes=4, load_skew=False,
                                       weight_segments=4, **SMALL),
    # A segment per row with the load skew: a GEMM's next LOADW goes beside its MATMUL
    # (paired_loads).
    "4x4-paired-loads": NpuConfig(rows=4, cols=4, requant_lanes=2, weight_segments=4,
                                  **SMALL),
    "4x4-int4-acc16": NpuConfig(rows=4, cols=4, input_width=4, weight_width=4,
                                accumulator_width=16, **SMALL),
    # The UP5K's lean options: the requantizer's product serial (2 bits of a 24-bit
    # accumulator a cycle, a channel every 12 cycles, the rounding shift in place), no max
    # pooling, no adds, only the cycles counter (the others compare as absent), one weight
    # bank per PE (the programs' bank fields read as 0: each load waits for the rows
    # before it), rows broadcast, and single-port activations (in SPRAM with the iCE40
    # primitives; generic simulations invert every lane of a read in a cycle the memory
    # is written).
    "4x4-serial-requant": NpuConfig(rows=4, cols=4, requant_lanes=1, max_pooling=False,
                                    adds=False, requant_serial_bits=2, accumulator_width=24,
                                    activity_counters=False, weight_banks=1,
                                    row_broadcast=True, load_skew=False,
                                    single_port_activations=True, **SMALL),
}


def zero_point_cases(config: NpuConfig) -> list[tuple[int, tuple[int, int]]]:
    low, high = -(1 << (config.input_width - 1)), (1 << (config.input_width - 1)) - 1
    return [(low, (low, high)), (high, (low, high)), (0, (0, high)), (3, (0, 6)),
            (0, (-300, 300))]


# Every config generic, and some with the boards' mappings (hw/dsp.py) simulated with the
# primitives' models: the same golden results. ECP5: a MULT18X18D with input registers per
# product (8x8); with a DSP budget of one row (2x3), the second row's products in logic.
# iCE40: two products per SB_MAC16 (yosys's model), with an odd last column alone (2x3),
# narrower operands (int4), and the iCEBreaker's 4x2 without feature maps.
ECP5_ONE_DSP_ROW = Implementation("ecp5", dsp_products=3)
PRIMITIVE_CASES = [
    pytest.param(name, simulator.values[0], primitives, marks=simulator.marks,
                 id=f"{name}-{simulator.id}-{getattr(primitives, 'name', primitives)}"
                 if primitives else f"{name}-{simulator.id}")
    for name, primitives in [*((name, None) for name in CONFIGS), ("2x3", ECP5_ONE_DSP_ROW),
                             ("8x8", "ecp5"), ("2x3", "ice40"), ("4x4-int4-acc16", "ice40"),
                             ("4x2-no-feature-maps", "ice40"), ("4x4-serial-requant", "ice40")]
    for simulator in available_simulators()]


@pytest.mark.parametrize("name, simulator, primitives", PRIMITIVE_CASES)
def test_npu_matches_golden(name, simulator, primitives):
    config = CONFIGS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    gemms = gemm_jobs(config, rng, count=4)
    chains = [layer_chain_job(config, rng, m=int(rng.integers(1, 12)),
                              k=int(rng.integers(1, 3 * config.rows)),
                              n=int(rng.integers(1, 3 * config.cols)),
                              n2=int(rng.integers(1, 2 * config.cols)),
                              zero_point=zp, clamp=clamp)
              for zp, clamp in zero_point_cases(config)]
    wrap, wrap_plan = wrap_job(config, rng)
    walks = [walk_change_job(config, rng)] if config.feature_maps else []
    jobs = [job for job, _, _ in gemms] + chains + [back_to_back_accumulate_job(config, rng),
                                                     weight_reload_job(config, rng),
                                                     rounding_job(config, rng),
                                                     param_walk_job(config, rng),
                                                     weight_readback_job(config, rng),
                                                     *walks, wrap]
    results = simulate(jobs, simulator=simulator, primitives=primitives)
    for (job, plan, expected), result in zip(gemms, results, strict=False):
        golden = run_golden(job)
        assert np.array_equal(matmul_output(plan, result), expected.astype(np.int32)), (
            f"M={plan.m} K={plan.k} N={plan.n}")
        assert result.counters == golden.counters, f"M={plan.m} K={plan.k} N={plan.n}"
    for job, result in zip(jobs[len(gemms):], results[len(gemms):], strict=True):
        golden = run_golden(job)
        for key, value in golden.outputs.items():
            assert np.array_equal(result.outputs[key], value), key
        assert result.counters == golden.counters
    wrapped = matmul_output(wrap_plan, results[-1])
    assert np.array_equal(wrapped, matmul_output(wrap_plan, run_golden(wrap)))
    assert (wrapped < 0).all(), "the accumulators did not wrap around"


@pytest.mark.parametrize("name", [name for name, config in CONFIGS.items()
                                  if config.rounding == "both"])
def test_rounding_job_tells_the_roundings_apart(name):
    """On an NPU with both roundings, rounding_job's REQUANTs alternate double, single and
    single with ties to even, and the three give different outputs (so a lane that ignored
    the choice would fail)."""
    config = CONFIGS[name]
    outputs = run_golden(rounding_job(config, np.random.default_rng(0))).outputs["outputs"]
    blocks = outputs.reshape(6, rounding_job_words(config), config.rows)
    for first, again in zip(blocks[:3], blocks[3:], strict=True):
        assert np.array_equal(first, again)
    double, single, even = blocks[:3]
    assert not np.array_equal(double, single) and not np.array_equal(single, even)


MAPS = dict(activation_depth=2048, weight_depth=8192, accumulator_depth=256,
            instruction_depth=1024, param_depth=256)
MAP_CONFIGS = {
    "2x3": NpuConfig(rows=2, cols=3, **MAPS),
    "4x8": NpuConfig(rows=4, cols=8, requant_lanes=2, **MAPS),
    "8x4": NpuConfig(rows=8, cols=4, **MAPS),
    "8x8": NpuConfig(rows=8, cols=8, requant_lanes=4, **MAPS),
    # One lane, so that each REQUANT takes eight cycles a word and runs (overlap) beside
    # the next tile's GEMM, the accumulator halves alternating.
    "4x8-overlap": NpuConfig(rows=4, cols=8, requant_lanes=1, requant_overlap=True, **MAPS),
    # A lane per column on a square array: the add's inputs read from their maps
    # (SETOUT from_map).
    "4x4-from-map": NpuConfig(rows=4, cols=4, requant_lanes=4, requant_overlap=True, **MAPS),
    # The weight memory in a part per row, the loads paired with the MATMULs.
    "4x4-paired-loads": NpuConfig(rows=4, cols=4, weight_segments=4, **MAPS),
    # The add's inputs looked up in rescale tables (TABLE, RESCALE), its output REQUANT
    # beside the next chunk's lookups.
    "4x4-rescale-tables": NpuConfig(rows=4, cols=4, requant_lanes=2, requant_overlap=True,
                                    rescale_tables=True, **MAPS),
}
def halo_words(fmap, words: np.ndarray) -> np.ndarray:
    """The halo words of ``fmap``'s tiles that hold channels, from its words."""
    tiles = -(-fmap.channels // fmap.rows)
    image = np.asarray(words)[:tiles * fmap.tile_words].reshape(
        tiles, fmap.padded_height, fmap.pitch, fmap.rows)
    inside = np.zeros((fmap.padded_height, fmap.pitch), dtype=bool)
    inside[fmap.halo[0]:fmap.halo[0] + fmap.height, fmap.halo[1]:fmap.halo[1] + fmap.width] = 1
    return image[:, ~inside]


#: The depthwise mode: one line buffer (two row groups) and no overlap; two line buffers
#: (three groups, the whole 3×3 kernel in one pass) with the overlap.
DEPTHWISE_CONFIGS = {
    "6x6-depthwise": NpuConfig(rows=6, cols=6, line_buffer_depth=16, **MAPS),
    "9x9-depthwise-overlap": NpuConfig(rows=9, cols=9, requant_lanes=3, line_buffer_depth=12,
                                       requant_overlap=True, **MAPS),
    # Three groups on an 8×8 with the tap row (depthwise_tap_row): the weights in a part
    # per row (the loads paired with the MATMULs), beside the overlap; and in one part.
    "8x8-tap-row-paired": NpuConfig(rows=8, cols=8, requant_lanes=4, line_buffer_depth=16,
                                    requant_overlap=True, weight_segments=8,
                                    depthwise_tap_row=True, **MAPS),
    "8x8-tap-row": NpuConfig(rows=8, cols=8, line_buffer_depth=16, depthwise_tap_row=True,
                             **MAPS),
    # With the UP5K's lean options: a serial requantizer product (5 bits a cycle: seven
    # cycles a channel) beside the overlap, no max pooling, no adds, only the cycles
    # counter, one weight bank per PE.
    "6x6-depthwise-serial": NpuConfig(rows=6, cols=6, requant_lanes=2, line_buffer_depth=16,
                                      requant_overlap=True, max_pooling=False, adds=False,
                                      requant_serial_bits=5, activity_counters=False,
                                      weight_banks=1, row_broadcast=True, load_skew=False,
                                      **MAPS),
}
MAP_KINDS = ("conv", "depthwise", "maxpool", "avgpool", "globalpool", "add")


def map_kinds(config: NpuConfig) -> list[str]:
    """The MAP_KINDS ``config`` runs: max pooling and adds only where built."""
    return [kind for kind in MAP_KINDS
            if (kind != "maxpool" or config.max_combine)
            and (kind != "add" or config.requant_to_acc)]


@pytest.mark.parametrize("simulator", available_simulators())
@pytest.mark.parametrize("name", MAP_CONFIGS)
def test_feature_map_operators_match_golden(name, simulator):
    """Convolutions (implicit im2col), depthwise convolutions and pooling on seeded random
    maps: the RTL equals the golden model (outputs, halo and counters), which equals a
    direct computation of the operator."""
    config = MAP_CONFIGS[name]
    rng = np.random.default_rng(sum(map(ord, name)) + 6)
    assert_maps_match([(kind, *feature_map_job(config, rng, kind))
                       for kind in MAP_KINDS * 2], simulator)


@pytest.mark.parametrize("simulator", available_simulators())
@pytest.mark.parametrize("name", DEPTHWISE_CONFIGS)
def test_depthwise_mode_matches_golden(name, simulator):
    """3×3 depthwise convolutions in the depthwise mode (kernel taps in the rows, line
    buffers between the row groups), stride 1 and stride 2 (by phases: four strided
    walks of the map): the RTL equals the golden model (outputs, halos, counters), which
    equals a direct convolution; feature_map_operators' operators still run beside them
    on the same NPU."""
    config = DEPTHWISE_CONFIGS[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    cases = [("depthwise-mode", *depthwise_mode_job(config, rng, out_halo=bool(i % 2)))
             for i in range(6)]
    cases += [("depthwise-phases", *depthwise_mode_job(config, rng, out_halo=bool(i % 2),
                                                       stride=2)) for i in range(4)]
    assert_maps_match(cases + [(kind, *feature_map_job(config, rng, kind))
                               for kind in map_kinds(config)], simulator)


@pytest.mark.parametrize("simulator", available_simulators())
def test_interleaved_layers_match_golden(simulator):
    """A depthwise and a 1×1 convolution whose GEMMs the compiler moved ahead of
    REQUANTs (npugen.interleave): the RTL equals the golden model (outputs, counters:
    the cycle model's timing of the moved instructions and the fences), which equals a
    direct computation of both layers."""
    config = DEPTHWISE_CONFIGS["9x9-depthwise-overlap"]
    rng = np.random.default_rng(22)
    assert_maps_match([("depthwise+pointwise", *depthwise_pointwise_job(config, rng))],
                      simulator)


@pytest.mark.parametrize("simulator", available_simulators())
def test_fill_writes_sign_extended_lanes_of_any_width(simulator):
    """FILL's 8-bit value fills every lane of 4-, 8- and 12-bit activation words (sign
    extended, or cut to an int4 the value fits), along a two-level walk, over junk: the
    RTL equals the golden model."""
    from npugen.job import Job
    from npugen.memory_map import Region

    for width, value in ((4, -3), (8, -100), (12, -77)):
        config = NpuConfig(rows=2, cols=3, input_width=width, weight_width=8,
                           accumulator_width=max(16, width + 8), **SMALL)
        job = Job(config)
        rng = np.random.default_rng(width)
        low = -(1 << (width - 1))
        job.write(Region.ACTIVATIONS, 0, rng.integers(low, -low, (64, config.rows)))
        job.write(Region.INSTRUCTIONS, 0, encode_program(assemble(
            f"FILL value={value} out_addr=3 count=10 row_length=2 row_step=7\n"
            f"FILL value={value + 1} out_addr=40 count=5\nHALT")))
        job.read("words", Region.ACTIVATIONS, 0, 64)
        golden = run_golden(job)
        assert (golden.outputs["words"][[3, 4, 10, 11, 31, 32, 40, 44]] == [
            [value] * 2] * 6 + [[value + 1] * 2] * 2).all()
        result, = simulate([job], simulator=simulator)
        assert np.array_equal(result.outputs["words"], golden.outputs["words"]), width


@pytest.mark.parametrize("simulator", available_simulators())
@pytest.mark.parametrize("primitives", [None, "ice40"])
def test_single_port_activations_fill_after_the_feeder(simulator, primitives):
    """With single_port_activations a FILL waits for the feeder's last read and the MATMUL
    after it, which reads the filled words, for its last write: the RTL (generic, which
    corrupts a read in a write cycle, and with the activations in SPRAM) equals the golden
    model's outputs and cycles."""
    from npugen.job import Job
    from npugen.memory_map import Region

    config = CONFIGS["4x4-serial-requant"]
    rng = np.random.default_rng(5)
    job = Job(config)
    job.write(Region.ACTIVATIONS, 0, rng.integers(-128, 128, (64, config.rows)))
    job.write(Region.WEIGHTS, 0, rng.integers(-128, 128, (config.rows, config.cols)))
    job.write(Region.INSTRUCTIONS, 0, encode_program(assemble(
        "LOADW\nMATMUL count=30\nFILL value=-7 out_addr=40 count=6\n"
        "MATMUL act_addr=36 acc_addr=30 count=12\nHALT")))
    job.read("activations", Region.ACTIVATIONS, 0, 64)
    job.read("accumulators", Region.ACCUMULATORS, 0, 42)
    golden = run_golden(job)
    assert (golden.outputs["activations"][40:46] == -7).all()
    result, = simulate([job], simulator=simulator, primitives=primitives)
    for key, value in golden.outputs.items():
        assert np.array_equal(result.outputs[key], value), key
    assert result.counters == golden.counters


def assert_maps_match(cases, simulator: str) -> None:
    """Each (kind, job, expected output, output map) on the simulator: the golden model's
    pixels are the expected ones, its halo the map's fill, nothing past the map written,
    and the RTL's output, guard and counters equal the golden model's."""
    results = simulate([job for _, job, _, _ in cases], simulator=simulator)
    for (kind, job, expected, dst), result in zip(cases, results, strict=True):
        golden = run_golden(job)
        shape = f"{kind} {dst.channels}×{dst.height}×{dst.width}"
        assert np.array_equal(dst.unpack(golden.outputs["output"]), expected), shape
        assert (halo_words(dst, golden.outputs["output"]) == dst.fill).all(), shape
        assert (golden.outputs["guard"] == GUARD_VALUE).all(), f"{shape} wrote past its map"
        assert np.array_equal(result.outputs["output"], golden.outputs["output"]), shape
        assert np.array_equal(result.outputs["guard"], golden.outputs["guard"]), shape
        assert result.counters == golden.counters, shape


@pytest.mark.parametrize("simulator", available_simulators())
@pytest.mark.parametrize("family, primitive, in_array, per_lane", [
    (ECP5_ONE_DSP_ROW, "MULT18X18D", 3, 3), ("ice40", ICE40_MAC_STANDIN, 4, 4)],
    ids=["ecp5", "ice40"])
def test_primitives_are_in_the_simulated_design(simulator, family, primitive, in_array,
                                                per_lane):
    """simulate(..., primitives=family) builds the 2×3 NPU with the hand-instantiated
    blocks (ECP5 with a budget of three products: one MULT18X18D per PE of the first row,
    the second row's products in logic, and three per requantizer lane (the 32 × 32
    product from three of 18-bit operands); iCE40: one SB_MAC16
    per pair of columns and one in its 16×16 mode per third-column PE and per requantizer
    product) and compiles their model beside it (the generic build has none)."""
    config = CONFIGS["2x3"]
    mapped = build(config, simulator, primitives=family)
    verilog = (mapped / "npu.v").read_text()
    assert verilog.count(f"{primitive} #(") == in_array + config.requant_lanes * per_lane
    if family is ECP5_ONE_DSP_ROW:
        assert verilog.count("product_mult18x18d") == in_array  # row 1 multiplies in logic
    assert f"module {primitive}" in (mapped / f"{primitive}.v").read_text()
    generic = build(config, simulator)
    assert generic != mapped and primitive not in (generic / "npu.v").read_text()


def test_primitives_are_refused_where_they_cannot_run():
    config = CONFIGS["1x1"]
    job = gemm_jobs(config, np.random.default_rng(0), count=1)[0][0]
    with pytest.raises(ValueError, match="the amaranth simulator runs the generic design"):
        simulate([job], simulator="amaranth", primitives="ecp5")
    with pytest.raises(ValueError, match="family must be one of ecp5, ice40, .* not 'gowin'"):
        build(config, "verilator", primitives="gowin")


def test_a_finished_verilator_build_keeps_its_executable_only(monkeypatch, tmp_path):
    """build_simulation deletes a Verilator build's precompiled headers, objects and
    archive, reuses the build for the same sources and arguments, and builds again when a
    source, an argument or the executable changes."""
    from npugen.sim import runner

    builds = []

    class FakeRunner:
        def build(self, *, build_dir, hdl_toplevel, **_):
            builds.append(hdl_toplevel)
            for name in (hdl_toplevel, "Vtop__pch.h.fast.gch", "Vtop.o", "Vtop__ALL.a"):
                (build_dir / name).write_text("built")

    monkeypatch.setattr(runner, "_runner", lambda simulator: FakeRunner())
    source = tmp_path / "npu.v"
    source.write_text("module npu; endmodule")
    runner.build_simulation("verilator", [source], "npu_tb", tmp_path, ["-O2"])
    assert sorted(path.name for path in tmp_path.iterdir()) == \
        ["build.stamp", "npu.v", "npu_tb"]
    runner.build_simulation("verilator", [source], "npu_tb", tmp_path, ["-O2"])
    assert len(builds) == 1
    runner.build_simulation("verilator", [source], "npu_tb", tmp_path, ["-O3"])
    source.write_text("module npu; wire a; endmodule")
    runner.build_simulation("verilator", [source], "npu_tb", tmp_path, ["-O3"])
    (tmp_path / "npu_tb").unlink()
    runner.build_simulation("verilator", [source], "npu_tb", tmp_path, ["-O3"])
    assert len(builds) == 4


def test_build_folder_is_per_toolchain(monkeypatch, tmp_path):
    """A cached simulator build keeps absolute paths into cocotb; one made with another
    environment's cocotb (since deleted) is not reused."""
    import cocotb

    config = NpuConfig(rows=2, cols=2)
    here = build_folder(config, "verilator", "npu", None, tmp_path)
    assert here == build_folder(config, "verilator", "npu", None, tmp_path)
    assert here.parent == tmp_path.resolve() / "sim"
    assert config.digest() in here.name
    monkeypatch.setattr(cocotb, "__file__", "/elsewhere/venv/cocotb/__init__.py")
    assert build_folder(config, "verilator", "npu", None, tmp_path) != here
