"""Seeded random jobs for whole-NPU tests: GEMMs, requantization, chained layers."""

from __future__ import annotations

import numpy as np

from npugen.config import NpuConfig
from npugen.golden import overlap_requants
from npugen.isa import Instruction, Opcode, assemble, encode_program
from npugen.job import Job
from npugen.matmul import matmul_job
from npugen.memory_map import Region
from npugen.schedule import gemm_instructions, plan_gemm, tile_activations, tile_weights


def random_operands(config: NpuConfig, rng: np.random.Generator, m: int, k: int, n: int):
    low_a, high_a = -(1 << (config.input_width - 1)), 1 << (config.input_width - 1)
    low_w, high_w = -(1 << (config.weight_width - 1)), 1 << (config.weight_width - 1)
    return rng.integers(low_a, high_a, (m, k)), rng.integers(low_w, high_w, (k, n))


def edge_shapes(config: NpuConfig) -> list[tuple[int, int, int]]:
    """Shapes at the tile edges: 1, rows−1, rows+1, and K much larger than rows."""
    r, c = config.rows, config.cols
    return [(1, 1, 1), (max(r - 1, 1), max(r - 1, 1), max(c - 1, 1)), (r + 1, r + 1, c + 1),
            (3, 9 * r + 3, 2 * c + 1), (2 * r + c + 5, r, c)]


def gemm_jobs(config: NpuConfig, rng: np.random.Generator, count: int):
    """(job, plan, expected) for edge shapes and ``count`` random shapes, some with bias."""
    shapes = edge_shapes(config) + [
        (int(rng.integers(1, 40)), int(rng.integers(1, 3 * config.rows + 2)),
         int(rng.integers(1, 3 * config.cols + 2))) for _ in range(count)]
    out = []
    for index, (m, k, n) in enumerate(shapes):
        a, w = random_operands(config, rng, m, k, n)
        span = 1 << (config.accumulator_width - 4)
        bias = rng.integers(-span, span, n) if index % 2 else None
        job, plan = matmul_job(config, a, w, bias)
        expected = a @ w + (0 if bias is None else bias)
        out.append((job, plan, expected))
    return out


def wrap_job(config: NpuConfig, rng: np.random.Generator):
    """Accumulators preloaded just below their maximum and positive products added, so
    every sum wraps around to a negative value."""
    m, k, n = 4, 2 * config.rows + 1, config.cols
    a, w = random_operands(config, rng, m, k, n)
    top = (1 << (config.accumulator_width - 1)) - 1
    bias = np.full(n, top - 5)
    job, plan = matmul_job(config, np.full_like(a, (1 << (config.input_width - 1)) - 1),
                           np.full_like(w, (1 << (config.weight_width - 1)) - 1), bias)
    return job, plan


def random_params(config: NpuConfig, rng: np.random.Generator, channels: int) -> np.ndarray:
    """(bias, multiplier, shift) per channel, with the edge cases mixed in."""
    span = 1 << min(12, config.accumulator_width - 4)
    bias = rng.integers(-span, span, channels)
    multiplier = rng.integers(1 << 30, (1 << 31) - 1, channels)
    shift = rng.integers(0, 12, channels)
    edges = [((1 << 30), 0), ((1 << 31) - 1, 31), ((1 << 31) - 1, 0), ((1 << 30), 1),
             ((1 << 31) - 1, 1), (0, 5)]
    for index, (mult, sh) in enumerate(edges[:channels]):
        multiplier[index], shift[index] = mult, sh
    return np.stack([bias, multiplier, shift], axis=1)


def single_rounding_values(config: NpuConfig) -> list[int]:
    """The REQUANT single_rounding values an NPU runs: both with rounding "both"."""
    return {"double": [0], "single": [1], "both": [0, 1]}[config.rounding]


def rounding_modes(config: NpuConfig) -> list[dict[str, int]]:
    """REQUANT's rounding fields for each rounding an NPU runs: double, single (half up),
    single with ties to even."""
    modes = [{"single_rounding": 0, "ties_to_even": 0}] if config.rounding != "single" else []
    if config.rounding != "double":
        modes += [{"single_rounding": 1, "ties_to_even": 0},
                  {"single_rounding": 1, "ties_to_even": 1}]
    return modes


def layer_chain_job(config: NpuConfig, rng: np.random.Generator, *, m: int, k: int, n: int,
                    n2: int, zero_point: int, clamp: tuple[int, int]) -> Job:
    """GEMM → REQUANT into activation memory → second GEMM reading those activations.
    Each REQUANT takes one of the NPU's roundings at random.

    Reads back the requantized activations and both layers' accumulators.
    """
    lanes = config.requant_lanes
    a, w = random_operands(config, rng, m, k, n)
    _, w2 = random_operands(config, rng, n, n, n2)
    first = plan_gemm(config, m, k, n)
    out_base = first.activation_words
    second = plan_gemm(config, m, n, n2, act_base=out_base, weight_base=first.weight_words,
                       acc_base=first.accumulator_words)
    program = gemm_instructions(first)
    program.append(Instruction(Opcode.SETPP, {
        "zero_point": zero_point, "clamp_min": clamp[0], "clamp_max": clamp[1]}))
    groups_per_tile = config.cols // lanes
    for n_tile in range(first.n_tiles):
        channel = n_tile * config.cols
        program.append(Instruction(Opcode.SETREQ, {
            "param_addr": n_tile * groups_per_tile, "out_stride": m}))
        program.append(Instruction(Opcode.REQUANT, {
            "acc_addr": first.acc_addr(n_tile), "count": m,
            "out_addr": out_base + (channel // config.rows) * m,
            "out_lane": channel % config.rows,
            **rounding_modes(config)[rng.integers(len(rounding_modes(config)))]}))
    program += gemm_instructions(second)
    program.append(Instruction(Opcode.HALT))
    job = Job(config)
    job.write(Region.INSTRUCTIONS, 0, encode_program(program))
    job.write(Region.ACTIVATIONS, 0, tile_activations(first, a))
    # Random junk where the requantized activations go: REQUANT must overwrite it.
    job.write(Region.ACTIVATIONS, out_base, rng.integers(-8, 8, (second.activation_words,
                                                                 config.rows)))
    job.write(Region.WEIGHTS, 0, tile_weights(first, w))
    job.write(Region.WEIGHTS, second.weight_base, tile_weights(second, w2))
    params = random_params(config, rng, first.n_tiles * config.cols)
    job.write(Region.PARAMS, 0, params.reshape(-1, lanes, 3))
    job.read("activations", Region.ACTIVATIONS, out_base, second.activation_words)
    job.read("first", Region.ACCUMULATORS, 0, first.accumulator_words)
    job.read("second", Region.ACCUMULATORS, second.acc_base, second.accumulator_words)
    return job


#: Accumulator words each REQUANT of :func:`rounding_job` requantizes.
ROUNDING_JOB_ROWS = 24


def rounding_job(config: NpuConfig, rng: np.random.Generator) -> Job:
    """The same accumulators requantized by back-to-back REQUANTs with each rounding the NPU
    runs (:func:`rounding_modes`), twice over, at right shifts of 1 to 3, where the roundings
    disagree on many values (half the channels multiply by exactly 0.5, so single
    rounding's ties are frequent): each REQUANT's results must follow its own choice. Reads
    back the outputs, one block of ``rounding_job_words`` words per REQUANT."""
    roundings = rounding_modes(config) * 2
    count, words = ROUNDING_JOB_ROWS, rounding_job_words(config)
    low, high = -(1 << (config.input_width - 1)), (1 << (config.input_width - 1)) - 1
    program = [Instruction(Opcode.SETPP, {"zero_point": 0, "clamp_min": low,
                                          "clamp_max": high}),
               Instruction(Opcode.SETREQ, {"param_addr": 0, "out_stride": count})]
    program += [Instruction(Opcode.REQUANT, {"acc_addr": 0, "count": count,
                                             "out_addr": i * words, **mode})
                for i, mode in enumerate(roundings)]
    program.append(Instruction(Opcode.HALT))
    job = Job(config)
    job.write(Region.INSTRUCTIONS, 0, encode_program(program))
    # Multipliers of 0.5 to 1 and shifts of 1 to 3: results mostly within the output range.
    channels = config.cols
    multipliers = rng.integers(1 << 30, 1 << 31, channels)
    multipliers[::2] = 1 << 30
    params = np.stack([np.zeros(channels, dtype=np.int64), multipliers,
                       rng.integers(1, 4, channels)], axis=1)
    job.write(Region.PARAMS, 0, params.reshape(-1, config.requant_lanes, 3))
    job.write(Region.ACCUMULATORS, 0, rng.integers(2 * low, 2 * high, (count, config.cols)))
    # The same junk where each REQUANT's outputs go (lanes past the last column keep it).
    junk = rng.integers(low, high, (words, config.rows))
    job.write(Region.ACTIVATIONS, 0, np.tile(junk, (len(roundings), 1)))
    job.read("outputs", Region.ACTIVATIONS, 0, len(roundings) * words)
    return job


def param_walk_job(config: NpuConfig, rng: np.random.Generator) -> Job:
    """A REQUANT after SETREQ's ``param_walk``: each accumulator word with the next channel
    groups' parameters (random multipliers, shifts and biases), then one without it, whose
    words all take the first groups' again. Reads back both REQUANTs' outputs."""
    count, blocks = 5, -(-config.cols // config.rows)
    low, high = -(1 << (config.input_width - 1)), (1 << (config.input_width - 1)) - 1
    single = int(config.rounding == "single")   # a rounding the NPU has
    program = [Instruction(Opcode.SETPP, {"zero_point": int(rng.integers(-20, 20)),
                                          "clamp_min": low, "clamp_max": high}),
               Instruction(Opcode.SETREQ, {"param_addr": 0, "out_stride": count,
                                           "param_walk": 1}),
               Instruction(Opcode.REQUANT, {"acc_addr": 0, "count": count, "out_addr": 0,
                                            "single_rounding": single}),
               Instruction(Opcode.SETREQ, {"param_addr": 0, "out_stride": count}),
               Instruction(Opcode.REQUANT, {"acc_addr": 0, "count": count,
                                            "out_addr": count * blocks,
                                            "single_rounding": single}),
               Instruction(Opcode.HALT)]
    job = Job(config)
    job.write(Region.INSTRUCTIONS, 0, encode_program(program))
    channels = count * config.cols
    span = 1 << min(config.accumulator_width - 2, 20)
    params = np.stack([rng.integers(-span, span, channels),
                       rng.integers(1 << 30, 1 << 31, channels),
                       rng.integers(4, 12, channels)], axis=1)
    job.write(Region.PARAMS, 0, params.reshape(-1, config.requant_lanes, 3))
    job.write(Region.ACCUMULATORS, 0, rng.integers(-span, span, (count, config.cols)))
    # Lanes past the last column keep what is there: junk, the same on both targets.
    job.write(Region.ACTIVATIONS, 0, rng.integers(low, high, (2 * count * blocks,
                                                               config.rows)))
    job.read("outputs", Region.ACTIVATIONS, 0, 2 * count * blocks)
    return job


def weight_readback_job(config: NpuConfig, rng: np.random.Generator) -> Job:
    """Weight words written and read back by the host around a run of HALT: the memory
    as the host addresses it (with ``weight_segments``, words spread over the parts by
    their address bits, read back through the parts' multiplexer)."""
    job = Job(config)
    job.write(Region.INSTRUCTIONS, 0, encode_program([Instruction(Opcode.HALT)]))
    low, high = -(1 << (config.weight_width - 1)), 1 << (config.weight_width - 1)
    words = 3 * config.rows + 1
    job.write(Region.WEIGHTS, config.rows - 1, rng.integers(low, high, (words, config.cols)))
    job.read("weights", Region.WEIGHTS, config.rows - 1, words)
    return job


def rounding_job_words(config: NpuConfig) -> int:
    """Activation words each REQUANT of :func:`rounding_job` writes."""
    return ROUNDING_JOB_ROWS * -(-config.cols // config.rows)


def _accumulator_job(config: NpuConfig, rng: np.random.Generator, program, *,
                     act_words: int, weight_words: int) -> Job:
    """``program`` with random activations, weights and accumulators; reads back the
    first 12 accumulator words."""
    job = Job(config)
    job.write(Region.INSTRUCTIONS, 0, encode_program(program))
    low_a, high_a = -(1 << (config.input_width - 1)), 1 << (config.input_width - 1)
    job.write(Region.ACTIVATIONS, 0, rng.integers(low_a, high_a, (act_words, config.rows)))
    low_w, high_w = -(1 << (config.weight_width - 1)), 1 << (config.weight_width - 1)
    job.write(Region.WEIGHTS, 0, rng.integers(low_w, high_w, (weight_words, config.cols)))
    span = 1 << (config.accumulator_width - 4)
    job.write(Region.ACCUMULATORS, 0, rng.integers(-span, span, (12, config.cols)))
    job.read("accumulators", Region.ACCUMULATORS, 0, 12)
    return job


def back_to_back_accumulate_job(config: NpuConfig, rng: np.random.Generator) -> Job:
    """One-row MATMULs issued on consecutive cycles into the same accumulator entry (and
    with one and two cycles between them): each must add onto the row written just
    before it, which is still in the accumulate pipeline."""
    program = assemble("""
        LOADW bank=0 weight_addr=0
        MATMUL bank=0 act_addr=0 acc_addr=5 count=1 accumulate=1
        MATMUL bank=0 act_addr=1 acc_addr=5 count=1 accumulate=1
        MATMUL bank=0 act_addr=2 acc_addr=5 count=2 accumulate=1
        MATMUL bank=0 act_addr=3 acc_addr=5 count=1 accumulate=1
        MATMUL bank=0 act_addr=0 acc_addr=7 count=3 accumulate=1
        MATMUL bank=0 act_addr=1 acc_addr=9 count=1 accumulate=0
        MATMUL bank=0 act_addr=2 acc_addr=7 count=1 accumulate=1
        HALT
    """)
    return _accumulator_job(config, rng, program, act_words=4,
                            weight_words=config.rows)


def weight_reload_job(config: NpuConfig, rng: np.random.Generator) -> Job:
    """Short MATMULs between LOADWs at the loader's tightest timing: tiles loaded back to
    back, a bank reloaded right behind its last word, a MATMUL right behind its load, a
    bank reloaded while its words are in flight (the LOADW must wait). A load that reached
    a PE before its last word had, or a word that ran ahead of its tile, changes sums."""
    r = config.rows
    program = assemble(f"""
        LOADW bank=0 weight_addr=0
        LOADW bank=1 weight_addr={r}
        MATMUL bank=0 act_addr=0 acc_addr=0 count=1
        MATMUL bank=1 act_addr=1 acc_addr=1 count=2
        LOADW bank=0 weight_addr={2 * r}
        MATMUL bank=0 act_addr=2 acc_addr=3 count=1
        LOADW bank=1 weight_addr={3 * r}
        LOADW bank=0 weight_addr={4 * r}
        MATMUL bank=1 act_addr=3 acc_addr=4 count=3
        MATMUL bank=0 act_addr=0 acc_addr=7 count=1 accumulate=1
        LOADW bank=0 weight_addr={r}
        MATMUL bank=0 act_addr=1 acc_addr=8 count=2 accumulate=1
        MATMUL bank=1 act_addr=2 acc_addr=10 count=1
        HALT
    """)
    return _accumulator_job(config, rng, program, act_words=6, weight_words=5 * r)


# -- Feature-map operators ------------------------------------------------------------------

def reference_conv(x: np.ndarray, weight: np.ndarray, stride: int,
                   pads: tuple[int, int, int, int], fill: int) -> np.ndarray:
    """Direct convolution of x (C, H, W) by weight (kh, kw, C_in, C_out), padding with
    ``fill``: the accumulators (C_out, OH, OW), by definition, not by the NPU's method."""
    kh, kw, _, c_out = weight.shape
    top, left, bottom, right = pads
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right)), constant_values=fill)
    out_h = (padded.shape[1] - kh) // stride + 1
    out_w = (padded.shape[2] - kw) // stride + 1
    acc = np.zeros((c_out, out_h, out_w), dtype=np.int64)
    for y in range(out_h):
        for xx in range(out_w):
            window = padded[:, y * stride:y * stride + kh, xx * stride:xx * stride + kw]
            acc[:, y, xx] = np.einsum("chw,hwcn->n", window, weight)
    return acc


def reference_pool(x: np.ndarray, kernel: int, stride: int, pads, fill: int,
                   reduce) -> np.ndarray:
    """Per-channel reduction (np.sum or np.max) over each window, padding with ``fill``."""
    top, left, bottom, right = pads
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right)), constant_values=fill)
    out_h = (padded.shape[1] - kernel) // stride + 1
    out_w = (padded.shape[2] - kernel) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w), dtype=np.int64)
    for y in range(out_h):
        for xx in range(out_w):
            window = padded[:, y * stride:y * stride + kernel, xx * stride:xx * stride + kernel]
            out[:, y, xx] = reduce(window.reshape(len(x), -1), axis=1)
    return out


def feature_map_job(config: NpuConfig, rng: np.random.Generator, kind: str):
    """A random operator on a random feature map, lowered by npugen.lowering, and the
    expected output computed directly: (job, expected (C, OH, OW), output map).

    ``kind``: conv, depthwise, maxpool, avgpool, globalpool or add (two maps with their
    own scales, TFLite's arithmetic). Shapes are odd sizes,
    channels not a multiple of the array and 1-channel inputs, kernels 1×1 to 7×7,
    strides 1 and 2, padding up to the kernel's size − 1 on each side.
    """
    from npugen.arith import quantize_multiplier, requantize, requantize_raw
    from npugen.featuremap import FeatureMap
    from npugen.lowering import Lowering, Requant, Rescale

    if kind == "add":
        return _add_job(config, rng, FeatureMap, Lowering, Requant, Rescale,
                        quantize_multiplier, requantize, requantize_raw)

    rows, cols = config.rows, config.cols
    channels = int(rng.choice([1, rows + 1, 2 * cols + 1, max(1, rows - 1)]))
    c_out = int(rng.integers(1, 2 * cols + 3))
    if kind == "conv":
        kernel = int(rng.integers(1, 8))
    elif kind in ("maxpool", "avgpool"):
        kernel = int(rng.choice([2, 3]))
    elif kind == "depthwise":
        kernel = int(rng.choice([1, 3, 5]))
    else:
        kernel = 1
    stride = int(rng.choice([1, 2])) if kind != "globalpool" else 1
    height, width = int(rng.integers(kernel, kernel + 6)), int(rng.integers(kernel, kernel + 6))
    pads = tuple(int(rng.integers(0, kernel)) for _ in range(4)) if kind != "globalpool" else (
        0, 0, 0, 0)
    fill = int(rng.integers(-128, 128)) if kind != "maxpool" else -128
    x = rng.integers(-128, 128, (channels, height, width))
    src = FeatureMap(0, channels, height, width, rows, cols, halo=pads, fill=fill)
    if kind == "globalpool":
        out_h = out_w = 1
    else:
        out_h = (height + pads[0] + pads[2] - kernel) // stride + 1
        out_w = (width + pads[1] + pads[3] - kernel) // stride + 1
    out_channels = c_out if kind == "conv" else channels
    # The output map has a halo of its own, which the operator must leave alone.
    dst = FeatureMap(src.end, out_channels, out_h, out_w, rows, cols, halo=(1, 2, 0, 1),
                     fill=int(rng.integers(-128, 128)))
    bias = rng.integers(-2000, 2000, out_channels)
    multiplier = rng.integers(1 << 30, (1 << 31) - 1, out_channels)
    shift = rng.integers(0, 10, out_channels)
    zero_point = int(rng.integers(-20, 20))
    clamp = (-128, 127) if rng.random() < 0.5 else (zero_point, 127)
    if kind == "maxpool":  # values pass through: identity scale, no bias
        bias[:], multiplier[:], shift[:] = 0, (1 << 31) - 1, 0
    if kind == "globalpool" and rng.random() < 0.5:   # per tensor, as a pooling's are
        bias[:], multiplier[:], shift[:] = bias[0], multiplier[0], shift[0]
    requant = Requant(bias, multiplier, shift, zero_point, *clamp)
    lowering = Lowering(config)
    lowering.fill_halo(dst)   # FILLs, beside the operator's GEMMs
    if kind == "conv":
        weight = rng.integers(-128, 128, (kernel, kernel, channels, c_out))
        lowering.conv(src, dst, weight, requant, stride, pads)
        acc = reference_conv(x, weight, stride, pads, fill)
    elif kind == "depthwise":
        weight = rng.integers(-128, 128, (kernel, kernel, channels))
        lowering.depthwise(src, dst, weight, requant, stride, pads)
        full = np.zeros((kernel, kernel, channels, channels), dtype=np.int64)
        for channel in range(channels):
            full[:, :, channel, channel] = weight[:, :, channel]
        acc = reference_conv(x, full, stride, pads, fill)
    elif kind in ("maxpool", "avgpool"):
        ones = np.ones((kernel, kernel, channels), dtype=np.int64)
        lowering.depthwise(src, dst, ones, requant, stride, pads,
                           combine_max=kind == "maxpool")
        acc = reference_pool(x, kernel, stride, pads, fill,
                             np.max if kind == "maxpool" else np.sum)
    else:
        lowering.global_sum(src, dst, requant)
        acc = x.reshape(channels, -1).sum(axis=1).reshape(channels, 1, 1)
    expected = requantize(acc.transpose(1, 2, 0), bias, multiplier, shift, zero_point,
                          *clamp, accumulator_width=config.accumulator_width,
                          output_width=config.input_width).transpose(2, 0, 1)
    return _map_job(config, rng, lowering, [(src, x)], dst), expected, dst


def depthwise_mode_job(config: NpuConfig, rng: np.random.Generator, *, out_halo: bool,
                       stride: int = 1, as_compiled: bool = False):
    """A random 3×3 depthwise convolution that runs in the array's depthwise mode (line
    buffers; with ``stride`` 2 by phases of the map), with the expected output computed
    directly: (job, expected, output map). Input halos up to one word wider than the pads
    (the results' extra words per row; with stride 2 the phase mode's rows above, as the
    compiler gives them), output maps with a halo (a REQUANT per row) or none (one per
    chunk)."""
    from npugen.arith import requantize
    from npugen.featuremap import FeatureMap, conv_output_size
    from npugen.lowering import Lowering, Requant

    channels = int(rng.choice([1, config.rows - 1, config.rows + 1, 2 * config.rows + 2]))
    low = 3 if stride == 1 else 6
    height, width = int(rng.integers(low, 9 + low)), int(rng.integers(low + 1, 9 + low))
    choices = [(1, 1, 1, 1), (0, 0, 0, 0)] + ([(0, 0, 1, 1)] if stride == 2 else [])
    pads = choices[int(rng.integers(0, len(choices)))] if rng.random() < 0.7 else (0, 0, 0, 0)
    halo = tuple(p + int(rng.integers(0, 2)) for p in pads)
    if stride == 2:
        halo = (halo[0] + 2 * config.depthwise_groups - 2, *halo[1:])
    fill = int(rng.integers(-128, 128))
    src = FeatureMap(0, channels, height, width, config.rows, config.cols, halo=halo,
                     fill=fill)
    dst = FeatureMap(src.end, channels, conv_output_size(height, 3, stride, pads[0], pads[2]),
                     conv_output_size(width, 3, stride, pads[1], pads[3]), config.rows,
                     config.cols, halo=(1, 1, 1, 1) if out_halo else (0, 0, 0, 0),
                     fill=int(rng.integers(-128, 128)))
    x = rng.integers(-128, 128, (channels, height, width))
    weight = rng.integers(-128, 128, (3, 3, channels))
    requant = Requant(rng.integers(-2000, 2000, channels),
                      rng.integers(1 << 30, (1 << 31) - 1, channels),
                      rng.integers(0, 10, channels), int(rng.integers(-20, 20)))
    lowering = Lowering(config)
    lowering.fill_halo(dst)
    # The mode itself, though the cycle model might find the diagonal tiles faster (with
    # the tap row's two loads a K tile, stride 2 can be); as_compiled: what the compiler
    # picks (Lowering.depthwise).
    if as_compiled:
        lowering.depthwise(src, dst, weight, requant, stride, pads)
    elif stride == 2:
        assert lowering._phase_mode(dst, (3, 3), stride)
        lowering._emit(src, dst, lowering._phase_tiles(weight), requant, (3, 3), stride, pads,
                       k_tiles=4, depthwise=True, phased=True)
    else:
        assert lowering._depthwise_mode(src, dst, (3, 3), stride)
        lowering._emit(src, dst, lowering._depthwise_mode_tiles(weight), requant, (3, 3),
                       stride, pads, k_tiles=lowering._depthwise_passes(), depthwise=True)
    assert as_compiled or any(ins.opcode is Opcode.SETWIN and ins["depthwise"]
                              for ins in lowering.instructions)
    full = np.zeros((3, 3, channels, channels), dtype=np.int64)
    for channel in range(channels):
        full[:, :, channel, channel] = weight[:, :, channel]
    acc = reference_conv(x, full, stride, pads, fill)
    expected = requantize(acc.transpose(1, 2, 0), requant.bias, requant.multiplier,
                          requant.shift, requant.zero_point, -128, 127,
                          accumulator_width=config.accumulator_width,
                          output_width=config.input_width).transpose(2, 0, 1)
    return _map_job(config, rng, lowering, [(src, x)], dst), expected, dst


def depthwise_pointwise_job(config: NpuConfig, rng: np.random.Generator):
    """A 3×3 depthwise convolution in the depthwise mode and a 1×1 convolution of its
    output, two channel tiles each, on an NPU whose requantizer takes longer than the
    array (a MobileNet block): the program as the compiler interleaves it
    (:func:`npugen.interleave.interleave`, which must have moved GEMMs), with the
    expected output computed directly: (job, expected, output map)."""
    from npugen.arith import requantize
    from npugen.featuremap import FeatureMap
    from npugen.interleave import interleave
    from npugen.lowering import Lowering, Requant

    channels, c_out, height, width = 2 * config.rows, 2 * config.cols, 8, 8
    fill = int(rng.integers(-128, 128))
    src = FeatureMap(0, channels, height, width, config.rows, config.cols,
                     halo=(1, 1, 1, 1), fill=fill)
    mid = FeatureMap(src.end, channels, height, width, config.rows, config.cols)
    dst = FeatureMap(mid.end, c_out, height, width, config.rows, config.cols)
    x = rng.integers(-128, 128, (channels, height, width))

    def random_requant(n: int) -> Requant:
        return Requant(rng.integers(-2000, 2000, n), rng.integers(1 << 30, (1 << 31) - 1, n),
                       rng.integers(6, 12, n), int(rng.integers(-20, 20)))

    depthwise, pointwise = rng.integers(-128, 128, (3, 3, channels)), rng.integers(
        -128, 128, (1, 1, channels, c_out))
    first, second = random_requant(channels), random_requant(c_out)
    lowering = Lowering(config)
    assert lowering.depthwise(src, mid, depthwise, first, 1, (1, 1, 1, 1))
    lowering.conv(mid, dst, pointwise, second)
    program = lowering.instructions + [Instruction(Opcode.HALT)]
    interleaved, _ = interleave(config, program)
    assert interleaved != overlap_requants(config, program), "interleave moved nothing"

    full = np.zeros((3, 3, channels, channels), dtype=np.int64)
    for channel in range(channels):
        full[:, :, channel, channel] = depthwise[:, :, channel]

    def layer(values: np.ndarray, weight: np.ndarray, pads: tuple, requant: Requant):
        acc = reference_conv(values, weight, 1, pads, fill)
        return requantize(acc.transpose(1, 2, 0), requant.bias, requant.multiplier,
                          requant.shift, requant.zero_point, -128, 127,
                          accumulator_width=config.accumulator_width,
                          output_width=config.input_width).transpose(2, 0, 1)

    expected = layer(layer(x, full, (1, 1, 1, 1), first), pointwise, (0, 0, 0, 0), second)
    job = _map_job(config, rng, lowering, [(src, x)], dst, program=interleaved)
    return job, expected, dst


#: The value of the words just past an operator's output map: it must not write there.
GUARD_VALUE = 77


def _map_job(config: NpuConfig, rng: np.random.Generator, lowering, inputs, dst, *,
             program: list[Instruction] | None = None) -> Job:
    """The lowered program (or ``program``) with its input maps, junk where the output
    goes (the operator and its FILLs must overwrite it) and a guard past the output map
    (it must not write there)."""
    job = Job(config)
    # As the compiler does: each REQUANT beside the steps after it where they allow.
    job.write(Region.INSTRUCTIONS, 0, encode_program(program or overlap_requants(
        config, lowering.instructions + [Instruction(Opcode.HALT)])))
    for fmap, values in inputs:
        job.write(Region.ACTIVATIONS, fmap.base, fmap.pack(values))
    # Junk in the output map, its halo too: the operator writes the pixels and the
    # program's FILLs (fill_halo) the halo.
    job.write(Region.ACTIVATIONS, dst.base, rng.integers(-128, 128, (dst.words, config.rows)))
    job.write(Region.WEIGHTS, 0, lowering.weights())
    job.write(Region.PARAMS, 0, lowering.params())
    job.read("output", Region.ACTIVATIONS, dst.base, dst.words)
    words = min(dst.tile_words + 4, config.activation_depth - dst.end)
    job.write(Region.ACTIVATIONS, dst.end, np.full((words, config.rows), GUARD_VALUE))
    job.read("guard", Region.ACTIVATIONS, dst.end, words)
    return job


def walk_change_job(config: NpuConfig, rng: np.random.Generator) -> Job:
    """SETWIN, SETKERN and SETOUT issued while the previous MATMUL still streams or the
    previous GEMM drains: each stream keeps the walk it was dispatched with. Also reduce
    mode with max (a sum on NPUs without max pooling), and a REQUANT along a two-row
    output walk (each REQUANT with one of the NPU's roundings: with both, one each)."""
    roundings = single_rounding_values(config)
    combine = int(config.max_combine)
    program = assemble(f"""
        SETWIN row_length=3 row_step=7 col_step=2
        LOADW bank=0 weight_addr=0
        MATMUL bank=0 act_addr=1 acc_addr=0 count=8
        SETWIN row_length=2 row_step=5 col_step=1 reduce=1
        MATMUL bank=0 act_addr=2 acc_addr=8 count=5 combine={combine}
        SETWIN
        MATMUL bank=0 act_addr=30 acc_addr=9 count=3 accumulate=1 combine={combine}
        SETKERN kernel_w=2 kernel_h=2 kernel_row_step=6
        SETGEMM weight_addr=0 k_tiles=8 tile_step=13
        SETWIN row_length=2 row_step=4 col_step=1
        GEMM bank=1 act_addr=3 acc_addr=12 count=4
        SETKERN kernel_w=1 kernel_h=1
        SETPP zero_point=-3 clamp_min=-100 clamp_max=100
        SETREQ param_addr=0 out_stride=11
        SETOUT row_length=2 row_step=5
        REQUANT acc_addr=0 count=6 out_addr=40 out_lane=0 single_rounding={roundings[0]}
        SETOUT
        REQUANT acc_addr=8 count=2 out_addr=60 out_lane=0 single_rounding={roundings[-1]}
        HALT
    """)
    job = Job(config)
    job.write(Region.INSTRUCTIONS, 0, encode_program(program))
    a_low, w_low = -(1 << (config.input_width - 1)), -(1 << (config.weight_width - 1))
    job.write(Region.ACTIVATIONS, 0, rng.integers(a_low, -a_low, (120, config.rows)))
    job.write(Region.WEIGHTS, 0, rng.integers(w_low, -w_low, (8 * config.rows, config.cols)))
    lanes = config.requant_lanes
    job.write(Region.PARAMS, 0,
              random_params(config, rng, 4 * config.cols).reshape(-1, lanes, 3))
    job.write(Region.ACCUMULATORS, 0, rng.integers(-3000, 3000, (16, config.cols)))
    job.read("accumulators", Region.ACCUMULATORS, 0, 16)
    job.read("activations", Region.ACTIVATIONS, 0, 120)
    return job


def _add_job(config, rng, FeatureMap, Lowering, Requant, Rescale, quantize_multiplier,
             requantize, requantize_raw):
    """Two random maps (different halos) added with their own scales."""
    rows, cols = config.rows, config.cols
    channels = int(rng.choice([1, rows + 1, 2 * cols + 1, max(1, rows - 1)]))
    height, width = int(rng.integers(1, 7)), int(rng.integers(1, 9))
    first = FeatureMap(0, channels, height, width, rows, cols, halo=(1, 1, 1, 1), fill=3)
    second = FeatureMap(first.end, channels, height, width, rows, cols)
    dst = FeatureMap(second.end, channels, height, width, rows, cols, halo=(0, 1, 2, 0),
                     fill=-7)
    x1 = rng.integers(-128, 128, (channels, height, width))
    x2 = rng.integers(-128, 128, (channels, height, width))
    scales = rng.uniform(0.005, 0.2, 3)
    twice = 2 * max(scales[0], scales[1])
    zeros = [int(z) for z in rng.integers(-128, 128, 3)]
    rescales = []
    for scale, zero in ((scales[0], zeros[0]), (scales[1], zeros[1])):
        rescales.append(Rescale(zero, *quantize_multiplier(scale / twice)))
    out_multiplier, out_shift = quantize_multiplier(twice / ((1 << 20) * scales[2]))
    clamp = (-128, 127) if rng.random() < 0.5 else (zeros[2], 127)
    requant = Requant(np.zeros(channels, dtype=np.int64), np.full(channels, out_multiplier),
                      np.full(channels, out_shift), zeros[2], *clamp)
    lowering = Lowering(config)
    lowering.fill_halo(dst)
    lowering.add(first, second, dst, rescales[0], rescales[1], requant)
    # TFLite's int8 Add, term by term: rounding twice, unless the NPU rounds only once.
    rounding = "single" if config.rounding == "single" else "double"
    raws = [requantize_raw(x.transpose(1, 2, 0), -r.zero_point, r.multiplier, r.shift, 0,
                           accumulator_width=32, rounding=rounding, left_shift=1)
            for x, r in ((x1, rescales[0]), (x2, rescales[1]))]
    expected = requantize(raws[0] + raws[1], 0, out_multiplier, out_shift, zeros[2], *clamp,
                          accumulator_width=32, output_width=8,
                          rounding=rounding).transpose(2, 0, 1)
    return _map_job(config, rng, lowering, [(first, x1), (second, x2)], dst), expected, dst
