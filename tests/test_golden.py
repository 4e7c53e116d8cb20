"""The golden model's program checks, GEMM expansion and cycle model."""

import numpy as np
import pytest

from npugen.arith import requantize
from npugen.config import NpuConfig
from npugen.golden import GoldenNpu, ProgramError, check_program, expand_program, overlap_requants
from npugen.isa import Instruction, Opcode, assemble, encode_program
from npugen.memory_map import Region
from npugen.schedule import gemm_instructions, plan_gemm, tile_activations, tile_weights

CONFIG = NpuConfig(rows=4, cols=4, activation_depth=256, weight_depth=256,
                   accumulator_depth=64, instruction_depth=64, param_depth=16)


@pytest.mark.parametrize("text, message", [
    ("MATMUL count=1", "a program must end with HALT"),
    ("MATMUL count=10 act_addr=250\nHALT", "activations end at word 260, activation_depth is 256"),
    ("MATMUL count=0\nHALT", "count must be at least 1"),
    ("LOADW weight_addr=254\nHALT", "weight tile rows end at word 258, weight_depth is 256"),
    ("REQUANT count=1 out_lane=2\nHALT", "out_lane must be a multiple of requant_lanes (4)"),
    ("SETPP clamp_min=5 clamp_max=-5\nHALT", "clamp_min must not exceed clamp_max"),
    ("GEMM count=4\nHALT", "k_tiles (SETGEMM) must be at least 1"),
    ("SETGEMM k_tiles=70\nGEMM count=1\nHALT", "weight tiles end at word 280"),
    ("SETREQ param_addr=16\nREQUANT count=1\nHALT",
     "parameter words end at word 17, param_depth is 16"),
    ("SETREQ param_addr=10 param_walk=1\nREQUANT count=7\nHALT",
     "parameter words end at word 17, param_depth is 16"),
])
def test_program_errors_name_the_instruction(text, message):
    with pytest.raises(ProgramError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_program(CONFIG, assemble(text))


def test_requant_rounding_must_be_one_the_npu_was_generated_with():
    """A lean NPU runs only its own rounding; with both, each REQUANT chooses."""
    for single in (0, 1):
        check_program(CONFIG, assemble(f"REQUANT count=1 single_rounding={single}\nHALT"))
    for rounding, single, asked in (("double", 1, "single"), ("single", 0, "double")):
        text = f"SETPP\nREQUANT count=1 single_rounding={single}\nHALT"
        check_program(CONFIG.replace(rounding=rounding),
                      assemble(f"SETPP\nREQUANT count=1 single_rounding={1 - single}\nHALT"))
        with pytest.raises(ProgramError, match=(
                f"instruction 1 .*: single_rounding={single} asks for {asked} rounding, but "
                f"this NPU was generated with rounding = '{rounding}' only; regenerate the NPU "
                f"with rounding = 'both'")):
            check_program(CONFIG.replace(rounding=rounding), assemble(text))
    # Halves to even: any rounding of an NPU with single rounding; none of a double-only one.
    for rounding in ("both", "single"):
        check_program(CONFIG.replace(rounding=rounding), assemble(
            "REQUANT count=1 single_rounding=1 ties_to_even=1\nHALT"))
    check_program(CONFIG, assemble("REQUANT count=1 ties_to_even=1\nHALT"))
    with pytest.raises(ProgramError, match=r"instruction 0 .*: ties_to_even=1, but this NPU "
                                           r"was generated with rounding = 'double' only"):
        check_program(CONFIG.replace(rounding="double"),
                      assemble("REQUANT count=1 ties_to_even=1\nHALT"))


def test_requant_follows_its_own_rounding():
    """The same accumulators, requantized by REQUANTs with single_rounding 0 and 1, equal
    arith.requantize with double and single rounding, which disagree on some of them."""
    rng = np.random.default_rng(3)
    acc = rng.integers(-300, 300, (16, 4))
    params = np.stack([np.zeros(4, dtype=np.int64), rng.integers(1 << 30, 1 << 31, 4),
                       rng.integers(1, 4, 4)], axis=1)
    npu = GoldenNpu(CONFIG)
    npu.write(Region.ACCUMULATORS, 0, acc)
    npu.write(Region.PARAMS, 0, params.reshape(1, 4, 3))
    npu.write(Region.INSTRUCTIONS, 0, encode_program(assemble(
        "SETPP clamp_min=-128 clamp_max=127\n"
        "REQUANT count=16 out_addr=0\nREQUANT count=16 out_addr=16 single_rounding=1\nHALT")))
    npu.run()
    got = {mode: npu.read(Region.ACTIVATIONS, 16 * index, 16)
           for index, mode in enumerate(("double", "single"))}
    for mode, values in got.items():
        assert np.array_equal(values, requantize(
            acc, 0, params[:, 1], params[:, 2], 0, -128, 127, accumulator_width=32,
            output_width=8, rounding=mode)), mode
    assert not np.array_equal(got["double"], got["single"])


def test_too_many_instructions():
    with pytest.raises(ProgramError, match="program has 65 instructions, instruction memory "
                                           "holds 64"):
        check_program(CONFIG, assemble("SETPP\n" * 64 + "HALT"))



def test_words_past_halt_are_not_decoded():
    """As on the NPU, which never fetches them: an unknown opcode after HALT does not stop
    the run; before HALT it does."""
    bad = (1 << 64) - 1   # every opcode bit set: no such instruction
    npu = GoldenNpu(CONFIG)
    npu.write(Region.INSTRUCTIONS, 0, np.array([*encode_program(assemble("SETPP\nHALT")),
                                                bad], dtype=np.uint64))
    assert npu.run().cycles > 0
    npu.write(Region.INSTRUCTIONS, 0, np.array([bad], dtype=np.uint64))
    with pytest.raises(ValueError):
        npu.run()

def test_gemm_equals_its_loadw_matmul_expansion():
    rng = np.random.default_rng(0)
    m, k, n = 9, 11, 6
    a, w = rng.integers(-128, 128, (m, k)), rng.integers(-128, 128, (k, n))
    plan = plan_gemm(CONFIG, m, k, n)
    gemm = assemble(f"SETGEMM k_tiles={plan.k_tiles} tile_step={m}\n"
                    f"GEMM count={m} acc_addr=0\nGEMM bank=1 count={m} acc_addr={m}\nHALT")
    explicit = [step for step in expand_program(CONFIG, gemm)]
    counters = []
    for program in (gemm, explicit):
        npu = GoldenNpu(CONFIG)
        npu.write(Region.ACTIVATIONS, 0, tile_activations(plan, a))
        npu.write(Region.WEIGHTS, 0, tile_weights(plan, w))
        npu.write(Region.INSTRUCTIONS, 0, encode_program(program))
        counters.append(npu.run())
        y = npu.read(Region.ACCUMULATORS, 0, 2 * m).reshape(2, m, 4).transpose(1, 0, 2)
        assert np.array_equal(y.reshape(m, 8)[:, :n], a @ w)
    assert counters[0] == counters[1]
    assert [s.opcode.name for s in explicit[:5]] == ["SETGEMM", "LOADW", "MATMUL", "LOADW",
                                                     "MATMUL"]
    assert explicit[3]["bank"] == 1 and explicit[4]["accumulate"] == 1


def test_cycle_model_hides_weight_loads():
    """Back-to-back tiles of a long stream cost no cycle beyond their rows."""
    m = 64
    plan = plan_gemm(CONFIG.replace(activation_depth=4096, weight_depth=4096,
                                    accumulator_depth=1024, instruction_depth=64), m, 16, 16)
    npu = GoldenNpu(plan.config)
    npu.write(Region.INSTRUCTIONS, 0, encode_program(
        gemm_instructions(plan) + [Instruction(Opcode.HALT)]))
    counters = npu.run()
    folds = plan.k_tiles * plan.n_tiles
    assert counters.busy_cycles == m * folds
    assert counters.cycles - m * folds <= 2 * (plan.config.rows + plan.config.cols) + 8


def run_gemm(config: NpuConfig, a: np.ndarray, w: np.ndarray):
    """``a @ w`` as one scheduled GEMM on the golden model: its counters and the
    accumulator words of its output tiles."""
    plan = plan_gemm(config, len(a), w.shape[0], w.shape[1])
    npu = GoldenNpu(plan.config)
    npu.write(Region.ACTIVATIONS, 0, tile_activations(plan, a))
    npu.write(Region.WEIGHTS, 0, tile_weights(plan, w))
    npu.write(Region.INSTRUCTIONS, 0, encode_program(
        gemm_instructions(plan) + [Instruction(Opcode.HALT)]))
    counters = npu.run()
    return counters, npu.read(Region.ACCUMULATORS, 0, plan.n_tiles * len(a))


def test_one_weight_bank_runs_the_same_program_with_each_load_after_the_rows_before():
    """With one weight register per PE (weight_banks 1) the bank fields read as 0: the
    outputs are those of two banks, and each LOADW waits for the MATMUL before it (a
    load no longer hides under the stream: the cycle model pays the difference)."""
    m = 64
    base = CONFIG.replace(activation_depth=4096, weight_depth=4096, accumulator_depth=1024,
                          instruction_depth=64)
    rng = np.random.default_rng(1)
    a, w = rng.integers(-128, 128, (m, 16)), rng.integers(-128, 128, (16, 16))
    (two, two_words), (one, one_words) = [run_gemm(base.replace(weight_banks=banks), a, w)
                                          for banks in (2, 1)]
    assert np.array_equal(one_words, two_words)
    assert one.busy_cycles == two.busy_cycles
    folds = (16 // base.rows) ** 2   # K tiles × output tiles of the 16×16 weights
    # Every load after the first waits for the rows of the tile before it to pass.
    assert one.cycles - two.cycles >= (folds - 1) * base.rows
    assert (two.cycles, one.cycles) == (1043, 1133)   # the figures in docs/ARCHITECTURE.md


def test_weight_segments_load_a_tile_in_fewer_cycles_with_the_same_outputs():
    """With the weight memory in S parts a tile loads in rows / S cycles: a batch-1 GEMM,
    one word per K tile and so bound by the loads, runs the same program to the same
    outputs in fewer cycles: a tile every two cycles once the loads take two (a LOADW and
    a MATMUL step dispatch a cycle apiece), and a tile a cycle with a part per row, each
    K tile's LOADW beside the MATMUL before it (paired_loads)."""
    base = CONFIG.replace(rows=8, cols=8, activation_depth=4096, weight_depth=4096,
                          accumulator_depth=1024, instruction_depth=64, requant_lanes=8)
    rng = np.random.default_rng(2)
    a, w = rng.integers(-128, 128, (1, 128)), rng.integers(-128, 128, (128, 64))
    results = {}
    for segments in (1, 2, 4, 8):
        counters, words = run_gemm(base.replace(weight_segments=segments), a, w)
        results[segments] = counters.cycles
        assert np.array_equal(words[:, :64].ravel(), (a @ w).ravel())
    tiles = 16 * 8
    assert results[1] > tiles * 8 and results[4] < tiles * 2 + 40
    assert results[1] > results[2] > results[4] > results[8]
    assert not base.replace(weight_segments=4).paired_loads
    assert base.replace(weight_segments=8).paired_loads
    # 128 tiles · (8, 4, 2, 1) + 24; paired, each of the 8 GEMMs' first LOADW alone.
    assert results == {1: 1048, 2: 536, 4: 280, 8: 160}


def test_loadw_off_a_tile_boundary_is_refused_with_weight_segments():
    config = CONFIG.replace(weight_segments=2)
    check_program(config, assemble("LOADW weight_addr=8\nHALT"))
    with pytest.raises(ProgramError, match=r"instruction 0 .*: weight_addr 6 is not a multiple "
                                           r"of rows \(4\), which an NPU generated with "
                                           r"weight_segments = 2 needs"):
        check_program(config, assemble("LOADW weight_addr=6\nHALT"))


def test_row_broadcast_writes_the_results_cols_minus_one_cycles_sooner():
    """With each row's activation broadcast to its columns, a result row is complete
    cols − 1 cycles sooner: HALT, which waits for the last write, comes that much
    earlier; the results are the same."""
    base = CONFIG.replace(load_skew=False)
    program = encode_program(assemble("LOADW\nMATMUL count=5\nHALT"))
    runs = []
    for broadcast in (False, True):
        npu = GoldenNpu(base.replace(row_broadcast=broadcast))
        npu.write(Region.ACTIVATIONS, 0, np.arange(20).reshape(5, 4) - 7)
        npu.write(Region.WEIGHTS, 0, np.arange(16).reshape(4, 4) - 5)
        npu.write(Region.INSTRUCTIONS, 0, program)
        runs.append((npu.run().cycles, npu.read(Region.ACCUMULATORS, 0, 5)))
    (skewed, words), (broadcast, same) = runs
    assert skewed - broadcast == base.cols - 1
    assert np.array_equal(words, same) and np.any(words)


def test_single_port_activations_keep_fill_off_the_feeders_reads():
    """With single_port_activations a FILL waits for the feeder's last read and nothing
    dispatches beside it (here a MATMUL that reads other words), so the run takes the
    FILL's words + FILL_TAIL_CYCLES + 1 cycles more; a MATMUL may then read the words
    the FILL wrote, which beside it the golden model refuses."""
    from npugen.timing import FILL_TAIL_CYCLES

    base = CONFIG.replace(rows=4, cols=4)
    cycles = {}
    for single_port in (False, True):
        npu = GoldenNpu(base.replace(single_port_activations=single_port))
        npu.write(Region.INSTRUCTIONS, 0, encode_program(assemble(
            "LOADW\nMATMUL count=30\nFILL value=3 out_addr=40 count=6\n"
            "MATMUL act_addr=0 acc_addr=30 count=12\nHALT")))
        cycles[single_port] = npu.run().cycles
    assert cycles[True] - cycles[False] == 6 + FILL_TAIL_CYCLES + 1
    reads_fill = assemble("LOADW\nMATMUL count=30\nFILL value=3 out_addr=40 count=6\n"
                          "MATMUL act_addr=36 acc_addr=30 count=12\nHALT")
    check_program(base.replace(single_port_activations=True), reads_fill)
    with pytest.raises(ProgramError, match="reads activation words that the overlapping "
                                           "FILL of instruction 2"):
        check_program(base, reads_fill)


def test_feature_map_instructions_need_an_npu_generated_with_them():
    config = CONFIG.replace(feature_maps=False)
    check_program(config, assemble("SETGEMM k_tiles=1 tile_step=4\nGEMM count=4\nHALT"))
    for text, what in (("SETWIN row_length=3", "SETWIN"), ("SETKERN kernel_w=3 kernel_h=3",
                                                          "SETKERN"),
                       ("MATMUL count=2 combine=1", "MATMUL combine"),
                       ("REQUANT count=1 to_acc=1", "REQUANT to_acc")):
        with pytest.raises(ProgramError, match=f"{what} needs an NPU generated with "
                                               f"feature_maps"):
            check_program(config, assemble(f"{text}\nHALT"))


OVERLAP = CONFIG.replace(requant_overlap=True)


@pytest.mark.parametrize("text, message", [
    # The MATMUL writes accumulator word 7, which the REQUANT (words 0 to 7) reads.
    ("REQUANT count=8 out_addr=100 overlap=1\nMATMUL acc_addr=7 count=4\nHALT",
     "instruction 1 .*: writes accumulator words 7 to 10, which the overlapping REQUANT of "
     "instruction 0"),
    # The MATMUL reads activation word 103, which the REQUANT writes (words 100 to 103).
    ("REQUANT count=4 out_addr=100 overlap=1\nSETWIN col_step=1\nMATMUL act_addr=103 "
     "acc_addr=8 count=1\nHALT",
     "instruction 2 .*: reads activation words that the overlapping REQUANT of instruction 0"),
    # Through a GEMM's steps too.
    ("SETGEMM k_tiles=1\nREQUANT count=4 out_addr=100 overlap=1\nGEMM act_addr=98 acc_addr=8 "
     "count=3\nHALT",
     "instruction 2 .*: reads activation words that the overlapping REQUANT of instruction 1"),
    ("REQUANT count=1 to_acc=1 out_addr=4 overlap=1\nHALT", "overlap=1 cannot go with to_acc=1"),
])
def test_an_overlapping_requant_keeps_the_steps_after_it_off_its_words(text, message):
    """The NPU does not wait for them: a program whose overlapped steps touched the
    REQUANT's words would depend on timing, and is refused."""
    with pytest.raises(ProgramError, match=message):
        check_program(OVERLAP, assemble(text))


def test_overlap_needs_an_npu_generated_with_it_and_ends_at_an_instruction_that_waits():
    text = "REQUANT count=8 out_addr=100 overlap=1\n{between}MATMUL acc_addr=0 count=4\nHALT"
    with pytest.raises(ProgramError, match="overlap=1, but this NPU was generated with "
                                           "requant_overlap = false"):
        check_program(CONFIG, assemble(text.format(between="")))
    # SETREQ waits for the REQUANT: the MATMUL after it may use its words.
    check_program(OVERLAP, assemble(text.format(between="SETREQ\n")))


def test_cycle_model_runs_an_overlapped_requant_beside_the_next_steps():
    """With overlap the MATMUL after the REQUANT dispatches the next cycle; without, it
    waits for the REQUANT's last write. SETREQ waits either way."""
    text = ("MATMUL acc_addr=0 count=8\nREQUANT count=8 out_addr=100 overlap={overlap}\n"
            "LOADW bank=1\nMATMUL bank=1 acc_addr=8 count=8\n{last}HALT")
    cycles = {}
    for overlap in (0, 1):
        for last in ("", "SETREQ\n"):
            npu = GoldenNpu(OVERLAP)
            npu.write(Region.INSTRUCTIONS, 0, encode_program(assemble(
                text.format(overlap=overlap, last=last))))
            cycles[overlap, last] = npu.run().cycles
    groups = 8 * (CONFIG.cols // CONFIG.requant_lanes)
    assert cycles[0, ""] - cycles[1, ""] >= groups
    # SETREQ waits for the REQUANT, which then ends after the MATMUL's drain.
    assert cycles[1, "SETREQ\n"] <= cycles[0, "SETREQ\n"]


@pytest.mark.parametrize("after, overlaps", [
    ("LOADW bank=1\nMATMUL bank=1 act_addr=0 acc_addr=8 count=8", True),
    # Reads activation word 103, which the REQUANT writes.
    ("LOADW bank=1\nMATMUL bank=1 act_addr=96 acc_addr=8 count=8", False),
    # Writes accumulator word 7, which the REQUANT reads.
    ("LOADW bank=1\nMATMUL bank=1 act_addr=0 acc_addr=7 count=8", False),
    # SETREQ waits for the REQUANT anyway.
    ("SETREQ\nMATMUL bank=0 act_addr=0 acc_addr=8 count=8", False),
])
def test_overlap_requants_sets_the_bit_where_the_steps_after_allow(after, overlaps):
    """The compiler's pass: a REQUANT runs beside the steps after it only where
    check_program allows it, fewer cycles; never with to_acc, nor on an NPU without
    requant_overlap."""
    program = assemble(f"MATMUL acc_addr=0 count=8\nREQUANT count=8 out_addr=100\n{after}\n"
                       "REQUANT count=1 to_acc=1 out_addr=20\nMATMUL acc_addr=0 count=1\nHALT")
    overlapped = overlap_requants(OVERLAP, program)
    check_program(OVERLAP, overlapped)
    assert [ins["overlap"] for ins in overlapped if ins.opcode is Opcode.REQUANT] == [
        int(overlaps), 0]
    assert overlap_requants(CONFIG, program) == program

    def cycles(instructions):
        npu = GoldenNpu(OVERLAP)
        npu.write(Region.INSTRUCTIONS, 0, encode_program(instructions))
        return npu.run().cycles

    assert (cycles(overlapped) < cycles(program)) is overlaps


DEPTHWISE = CONFIG.replace(rows=8, cols=8, requant_lanes=None, line_buffer_depth=16)


@pytest.mark.parametrize("config, text, message", [
    (CONFIG, "SETWIN depthwise=1 pitch=7\nMATMUL count=30", "generated without it"),
    (DEPTHWISE, "SETWIN depthwise=1 pitch=17\nMATMUL count=40",
     "pitch \\(SETWIN\\) is 17; the line buffers take 4 to 16"),
    (DEPTHWISE, "SETWIN depthwise=1 pitch=7 reduce=1\nMATMUL count=30",
     "cannot go with reduce"),
    (DEPTHWISE, "SETWIN depthwise=1 pitch=7 drop=7\nMATMUL count=30", "keep at least one"),
    (DEPTHWISE, "SETWIN depthwise=1 pitch=7\nMATMUL count=9", "lead of 9 words"),
    (DEPTHWISE, "SETWIN depthwise=1 pitch=7\nMATMUL count=20\nSETWIN depthwise=1 pitch=8\n"
                "MATMUL count=20", "still in the line buffers"),
    (DEPTHWISE, "SETGEMM k_tiles=1 tap_row=1\nGEMM count=4",
     "tap_row=1, but this NPU was generated without the depthwise tap row"),
    (DEPTHWISE.replace(depthwise_tap_row=True),
     "LOADW bank=1\nSETWIN depthwise=1 pitch=7\nMATMUL bank=1 count=30",
     "a depthwise-mode MATMUL on bank 1, whose tap row holds a weight of no tile of this run"),
    (DEPTHWISE.replace(depthwise_tap_row=True),
     "SETWIN depthwise=1 pitch=7\nSETGEMM k_tiles=1\nGEMM count=30", "load the bank twice"),
    (DEPTHWISE.replace(depthwise_tap_row=True, weight_depth=32),
     "SETGEMM weight_addr=24 k_tiles=1 tap_row=1\nGEMM count=4",
     "weight tiles end at word 40, weight_depth is 32"),
])
def test_depthwise_mode_programs_it_cannot_run_are_refused(config, text, message):
    with pytest.raises(ProgramError, match=message):
        check_program(config, assemble(text + "\nHALT"))


def test_depthwise_mode_pitch_may_change_once_the_line_buffers_drained():
    """After a REQUANT the next step waits (for it, and it for the drain), unless it has
    overlap; other MATMULs let the words drain one a cycle: 7 + 2 + 16 = 25 words after
    a pitch-7 stream on an 8×8 (depthwise_drain_words)."""
    change = "SETWIN depthwise=1 pitch=8\nMATMUL count=20\nHALT"
    first = "SETWIN depthwise=1 pitch=7\nMATMUL count=20\n"
    check_program(DEPTHWISE, assemble(first + "REQUANT count=4 out_addr=100\n" + change))
    overlap = DEPTHWISE.replace(requant_overlap=True)
    with pytest.raises(ProgramError, match="still in the line buffers"):
        check_program(overlap, assemble(
            first + "REQUANT acc_addr=40 count=4 out_addr=100 overlap=1\n" + change))
    plain = "SETWIN row_length=0 row_step=0 col_step=1\nMATMUL acc_addr=30 count={}\n"
    check_program(overlap, assemble(first + plain.format(25) + change))
    with pytest.raises(ProgramError, match="MATMULs of 25 words or more between them"):
        check_program(overlap, assemble(first + plain.format(24) + change))


def test_depthwise_mode_sums_a_window_and_drops_the_wrapping_results():
    """On an 8×8 (two row groups): result k is lane c's 3×2 window whose last tap is word
    lead + k, weight row 3g + j on the word g·pitch + j before it; with drop=2, the
    results of windows that wrap into the next row of pitch 5 are left out."""
    rng = np.random.default_rng(3)
    npu = GoldenNpu(DEPTHWISE)
    words = rng.integers(-128, 128, (40, DEPTHWISE.rows))
    weights = rng.integers(-128, 128, (DEPTHWISE.rows, DEPTHWISE.cols))
    npu.write(Region.ACTIVATIONS, 0, words)
    npu.write(Region.WEIGHTS, 0, weights)
    npu.write(Region.INSTRUCTIONS, 0, encode_program(assemble(
        "LOADW\nSETWIN col_step=1 depthwise=1 pitch=5 drop=2\nMATMUL count=40\nHALT")))
    npu.run()
    lead = 5 + 2
    expected = [sum(weights[3 * g + j] * words[i - 5 * g - j] for g in range(2)
                    for j in range(3))
                for i in range(lead, 40) if (i - 2) % 5 < 3]
    np.testing.assert_array_equal(npu.read(Region.ACCUMULATORS, 0, len(expected)), expected)


@pytest.mark.parametrize("segments", [1, 4, 8])
def test_the_tap_row_completes_the_window_with_the_bank_previous_tile(segments):
    """With the depthwise tap row an 8×8 sums three groups: rows 0 to 7 of the bank and,
    in the tap row, the bank's previous tile's row rows − L (L = rows / weight_segments),
    which SETGEMM tap_row loads first: GEMM's two LOADWs, then its MATMUL, equal the
    explicit steps, and the weight pointer moves two tiles."""
    config = DEPTHWISE.replace(depthwise_tap_row=True, weight_segments=segments)
    rng = np.random.default_rng(segments)
    words = rng.integers(-128, 128, (50, config.rows))
    tiles = rng.integers(-128, 128, (2 * config.rows, config.cols))
    pitch, lead = 6, 2 * 6 + 2
    window = np.vstack([tiles[:8], tiles[8 + 8 - config.load_rows]])
    expected = [sum(window[3 * g + j] * words[i - pitch * g - j] for g in range(3)
                    for j in range(3)) for i in range(lead, 50)]
    programs = {
        "steps": "LOADW weight_addr=8\nLOADW weight_addr=0\n"
                 f"SETWIN col_step=1 depthwise=1 pitch={pitch}\nMATMUL count=50\nHALT",
        "gemm": f"SETWIN col_step=1 depthwise=1 pitch={pitch}\n"
                "SETGEMM weight_addr=0 k_tiles=1 tap_row=1\nGEMM count=50\nHALT"}
    for text in programs.values():
        npu = GoldenNpu(config)
        npu.write(Region.ACTIVATIONS, 0, words)
        npu.write(Region.WEIGHTS, 0, tiles)
        npu.write(Region.INSTRUCTIONS, 0, encode_program(assemble(text)))
        npu.run()
        np.testing.assert_array_equal(npu.read(Region.ACCUMULATORS, 0, len(expected)),
                                      expected)
    steps = expand_program(config, assemble(programs["gemm"].replace("HALT", "GEMM count=50")))
    loads = [step["weight_addr"] for step in steps if step.opcode is Opcode.LOADW]
    assert loads == [8, 0, 24, 16]


@pytest.mark.parametrize("config", [
    NpuConfig(rows=5, cols=5, line_buffer_depth=16, depthwise_tap_row=True),
    NpuConfig(rows=8, cols=8, line_buffer_depth=16, depthwise_tap_row=True,
              weight_segments=4),
    NpuConfig(rows=4, cols=4, line_buffer_depth=16)], ids=["5x5-tap-row", "8x8-tap-row-S4",
                                                          "4x4-one-group"])
def test_depthwise_layers_equal_a_direct_convolution(config):
    """3×3 depthwise layers, stride 1 and 2, lowered as the compiler picks: on a 5×5 with
    the tap row (two groups: two passes of two K tiles, four tile loads), an 8×8 with the
    tap row and four weight parts (its weight from row 6), and a 4×4's one group (stride 2
    on diagonal tiles: the phases' windows are two rows high). The golden model equals a
    direct convolution."""
    from npugen.job import run_golden
    from programs import depthwise_mode_job

    config = config.replace(activation_depth=2048, weight_depth=2048, accumulator_depth=256,
                            param_depth=256)
    for seed in range(8):
        job, expected, dst = depthwise_mode_job(config, np.random.default_rng(seed),
                                                out_halo=bool(seed % 2), stride=1 + seed % 2,
                                                as_compiled=True)
        assert np.array_equal(dst.unpack(run_golden(job).outputs["output"]), expected), seed


def test_fill_writes_its_value_to_every_lane_along_its_walk():
    npu = GoldenNpu(CONFIG)
    npu.write(Region.INSTRUCTIONS, 0, encode_program(assemble(
        "FILL value=-7 out_addr=10 count=6 row_length=2 row_step=5\nHALT")))
    npu.run()
    filled = np.flatnonzero((npu.read(Region.ACTIVATIONS, 0, 40) == -7).all(axis=1))
    assert filled.tolist() == [10, 11, 15, 16, 20, 21]


@pytest.mark.parametrize("config, text, message", [
    (CONFIG.replace(feature_maps=False), "FILL count=4", "FILL needs an NPU generated with "
                                                         "feature_maps"),
    (CONFIG, "FILL count=0", "count must be at least 1"),
    (CONFIG, "FILL out_addr=250 count=4 row_length=2 row_step=5", "words filled end at word 257"),
    (CONFIG.replace(input_width=4, accumulator_width=16), "FILL value=9 count=1",
     "value must be an int4"),
    (CONFIG, "FILL out_addr=8 count=4\nMATMUL act_addr=10 count=2",
     "reads activation words that the overlapping FILL of instruction 0"),
])
def test_fills_the_npu_cannot_run_are_refused(config, text, message):
    with pytest.raises(ProgramError, match=message):
        check_program(config, assemble(text + "\nHALT"))


@pytest.mark.parametrize("config, text, message", [
    (CONFIG.replace(max_pooling=False), "MATMUL count=2 accumulate=1 combine=1",
     "MATMUL combine needs an NPU generated with max_pooling .this one has max_pooling = "
     "false.; regenerate it with max_pooling = true"),
    (CONFIG.replace(adds=False), "REQUANT count=2 to_acc=1",
     "REQUANT to_acc needs an NPU generated with adds .this one has adds = false."),
    (CONFIG.replace(adds=False), "REQUANT count=2 left_shift=1",
     "REQUANT left_shift needs an NPU generated with adds"),
    (CONFIG.replace(max_pooling=False, feature_maps=False), "MATMUL count=2 combine=1",
     "MATMUL combine needs an NPU generated with feature_maps"),
])
def test_max_combine_and_to_acc_are_refused_on_npus_without_them(config, text, message):
    """NPUs generated without max pooling or adds (their logic left out, for a UP5K)
    refuse the bits that need it, naming the option to regenerate with."""
    with pytest.raises(ProgramError, match=message):
        check_program(config, assemble("LOADW\n" + text + "\nHALT"))
    check_program(CONFIG, assemble("LOADW\n" + text + "\nHALT"))   # the default runs it


def test_cycle_model_runs_a_fill_beside_the_array_and_waits_for_it_after():
    """A MATMUL after a FILL dispatches the next cycle (the run ends when the longer of
    the two does); SETREQ (the requantizer's) waits one cycle per word and
    FILL_TAIL_CYCLES."""
    from npugen.timing import FILL_TAIL_CYCLES

    def cycles(text: str) -> int:
        npu = GoldenNpu(CONFIG)
        npu.write(Region.INSTRUCTIONS, 0, encode_program(assemble(text + "\nHALT")))
        return npu.run().cycles

    fill = "FILL out_addr=100 count=40\n"
    matmul = "SETWIN reduce=1\nMATMUL count=100"
    assert cycles(fill + matmul) == cycles(matmul) + 1
    assert cycles(fill + "SETREQ") == 2 + 40 + FILL_TAIL_CYCLES + 1 + 1


def test_requant_to_acc_from_a_map_equals_the_map_brought_in_by_a_matmul():
    """SETOUT from_map: a REQUANT to_acc reads int8 words of a map along SETOUT's walk
    (here rows of 3 words, pitch 5), as the identity MATMUL that brought them into the
    accumulators did, and gives the same accumulators (with accumulate, the sum)."""
    rng = np.random.default_rng(8)
    acts = rng.integers(-128, 128, (40, 4))
    params = np.stack([np.full(4, 7), rng.integers(1 << 30, 1 << 31, 4),
                       rng.integers(1, 4, 4)], axis=1)
    walk = [0, 1, 2, 5, 6, 7]
    requants = ("REQUANT acc_addr={src} count=6 out_addr=8 to_acc=1 left_shift=1\n"
                "REQUANT acc_addr={src} count=6 out_addr=8 to_acc=1 accumulate=1 "
                "left_shift=1\nHALT")
    programs = {
        "matmul": "SETWIN row_length=3 row_step=5 col_step=1\nSETPP\nSETREQ\nLOADW\n"
                  "MATMUL act_addr=4 count=6\n" + requants.format(src=0),
        "map": "SETPP\nSETREQ\nSETOUT row_length=3 row_step=5 from_map=1\n"
               + requants.format(src=4),
    }
    got = {}
    for name, text in programs.items():
        npu = GoldenNpu(OVERLAP)
        npu.write(Region.ACTIVATIONS, 0, acts)
        npu.write(Region.WEIGHTS, 0, np.eye(4, dtype=np.int64))
        npu.write(Region.PARAMS, 0, params.reshape(1, 4, 3))
        program = assemble(text)
        check_program(OVERLAP, program)
        npu.write(Region.INSTRUCTIONS, 0, encode_program(program))
        npu.run()
        got[name] = npu.read(Region.ACCUMULATORS, 8, 6)
    assert np.array_equal(got["map"], got["matmul"])
    assert np.any(acts[4:][walk] != acts[4:10])   # the walk skips words


@pytest.mark.parametrize("config, text, message", [
    (CONFIG, "SETOUT from_map=1\nHALT",
     r"from_map=1, but only NPUs generated with requant_overlap and feature_maps on a square "
     r"array with a requantizer lane per column read a REQUANT's source from a map \(this "
     r"one: 4×4, requant_lanes=4, requant_overlap=False\)"),
    (OVERLAP.replace(cols=8), "SETOUT from_map=1\nHALT",
     "this one: 4×8, requant_lanes=4, requant_overlap=True"),
    (OVERLAP.replace(requant_lanes=2), "SETOUT from_map=1\nHALT",
     "this one: 4×4, requant_lanes=2, requant_overlap=True"),
    (OVERLAP, "SETOUT from_map=1\nREQUANT count=1\nHALT",
     "instruction 1 .*: SETOUT's from_map is 1, which only a REQUANT to_acc reads"),
    (OVERLAP, "SETOUT row_length=2 row_step=250 from_map=1\nREQUANT acc_addr=10 count=4 "
              "to_acc=1\nHALT", "source activations end at word 262, activation_depth is 256"),
])
def test_requant_from_a_map_is_refused_where_the_npu_cannot_run_it(config, text, message):
    with pytest.raises(ProgramError, match=message):
        check_program(config, assemble(text))
    # A start clears it: SETOUT's defaults.
    check_program(OVERLAP, assemble("SETOUT from_map=1\nSETOUT\nREQUANT count=1\nHALT"))


@pytest.mark.parametrize("config", [
    DEPTHWISE.replace(activation_depth=2048, weight_depth=2048, accumulator_depth=256,
                      instruction_depth=1024, param_depth=256, requant_overlap=overlap,
                      rows=rows, cols=rows, requant_lanes=lanes, line_buffer_depth=16)
    for rows, lanes, overlap in ((8, 8, True), (6, 2, False), (9, 3, True))],
    ids=["8x8-overlap", "6x6", "9x9-overlap"])
def test_stride_two_depthwise_by_phases_equals_a_direct_convolution(config):
    """A 3×3 stride-2 depthwise layer in the depthwise mode by phases (four strided walks
    of the map, Lowering._phase_tiles), random shapes, pads and halos: the golden model
    runs the program and equals the convolution computed directly (test_npu_sim.py runs
    some on the RTL)."""
    from npugen.job import run_golden
    from programs import depthwise_mode_job

    for seed in range(12):
        job, expected, dst = depthwise_mode_job(config, np.random.default_rng(seed),
                                                out_halo=bool(seed % 2), stride=2)
        assert np.array_equal(dst.unpack(run_golden(job).outputs["output"]), expected), seed


TABLES = OVERLAP.replace(rescale_tables=True, param_depth=128)


def test_rescale_looks_each_lane_up_in_the_table_table_loaded():
    """TABLE takes table 0 from the parameter lanes' bias fields and table 1 from their
    multiplier fields (entry k·lanes + j from lane j of word k); RESCALE looks up every
    lane of its words along SETWIN's walk (an int8 value as its unsigned byte), writing
    or adding the entries."""
    rng = np.random.default_rng(4)
    lanes = TABLES.requant_lanes
    tables = rng.integers(-(1 << 31), 1 << 31, (2, 256))
    params = np.zeros((TABLES.table_param_words, lanes, 3), dtype=np.int64)
    params[..., 0] = tables[0].reshape(-1, lanes)
    params[..., 1] = tables[1].reshape(-1, lanes)
    acts = rng.integers(-128, 128, (40, 4))
    npu = GoldenNpu(TABLES)
    npu.write(Region.ACTIVATIONS, 0, acts)
    npu.write(Region.PARAMS, 3, params)
    program = assemble("TABLE param_addr=3\nSETWIN row_length=3 row_step=5 col_step=1\n"
                       "RESCALE table=0 act_addr=4 acc_addr=8 count=6\n"
                       "SETWIN col_step=1\n"
                       "RESCALE table=1 accumulate=1 act_addr=30 acc_addr=8 count=6\nHALT")
    check_program(TABLES, program)
    npu.write(Region.INSTRUCTIONS, 0, encode_program(program))
    npu.run()
    first = acts[4 + np.array([0, 1, 2, 5, 6, 7])] & 0xFF
    second = acts[30:36] & 0xFF
    expected = tables[0][first] + tables[1][second]
    expected = (expected + (1 << 31)) % (1 << 32) - (1 << 31)   # 32-bit accumulators
    assert np.array_equal(npu.read(Region.ACCUMULATORS, 8, 6), expected)


@pytest.mark.parametrize("config, text, message", [
    (OVERLAP, "TABLE\nHALT", "TABLE needs an NPU generated with rescale_tables"),
    (TABLES, "RESCALE count=1\nHALT", "RESCALE before any TABLE of this run"),
    (TABLES, "TABLE param_addr=65\nHALT",
     "the tables' parameter words end at word 129, param_depth is 128"),
    (TABLES, "TABLE\nSETWIN reduce=1\nRESCALE count=2\nHALT",
     "SETWIN set reduce or the depthwise mode, which RESCALE does not have"),
    (TABLES, "TABLE\nRESCALE acc_addr=62 count=4\nHALT",
     "accumulator words end at word 66, accumulator_depth is 64"),
    (TABLES, "TABLE\nRESCALE act_addr=250 count=10\nHALT",
     "activations end at word 260, activation_depth is 256"),
    # Beside an overlapping REQUANT: not its accumulator words nor its output words.
    (TABLES, "TABLE\nREQUANT count=8 out_addr=100 overlap=1\nRESCALE acc_addr=7 count=4\n"
             "HALT", "writes accumulator words 7 to 10, which the overlapping REQUANT"),
    (TABLES, "TABLE\nREQUANT count=4 out_addr=100 overlap=1\nRESCALE act_addr=103 "
             "acc_addr=8 count=1\nHALT",
     "reads activation words that the overlapping REQUANT of instruction 1"),
])
def test_rescale_programs_the_npu_cannot_run_are_refused(config, text, message):
    with pytest.raises(ProgramError, match=message):
        check_program(config, assemble(text))


def test_cycle_model_runs_a_table_once_the_requantizer_is_done_and_beside_the_array():
    """A TABLE dispatched beside an overlapping REQUANT starts when it is done; MATMULs
    dispatch beside the TABLE; a RESCALE waits for it, and the next instruction for the
    RESCALE's last write."""
    from npugen.timing import RESCALE_TAIL_CYCLES, TABLE_TAIL_CYCLES

    def cycles(text: str) -> int:
        npu = GoldenNpu(TABLES)
        npu.write(Region.INSTRUCTIONS, 0, encode_program(assemble(text + "\nHALT")))
        return npu.run().cycles

    table = TABLES.table_load_cycles + TABLE_TAIL_CYCLES
    requant = "REQUANT count=8 out_addr=100 overlap=1\n"
    matmul = "SETWIN reduce=1\nMATMUL count=600"   # longer than the TABLE
    # REQUANT dispatches at 2 and ends 8·groups + tail later; the TABLE starts then.
    alone = cycles(requant + "SETREQ")
    assert cycles(requant + "TABLE\nSETREQ") == alone + table
    assert cycles("TABLE\n" + matmul) == cycles(matmul) + 1
    # TABLE at 2, RESCALE when it is done, SETREQ at its last write, HALT the cycle after.
    assert cycles("TABLE\nRESCALE count=5\nSETREQ") == 2 + table + 5 + RESCALE_TAIL_CYCLES + 2
