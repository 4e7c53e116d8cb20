"""Seeded random jobs for whole-NPU tests: GEMMs, requantization, chained layers."""

from __future__ import annotations

import numpy as np

from npugen.config import NpuConfig
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


def layer_chain_job(config: NpuConfig, rng: np.random.Generator, *, m: int, k: int, n: int,
                    n2: int, zero_point: int, clamp: tuple[int, int]) -> Job:
    """GEMM → REQUANT into activation memory → second GEMM reading those activations.

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
            "out_lane": channel % config.rows}))
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
    job = Job(config)
    job.write(Region.INSTRUCTIONS, 0, encode_program(program))
    low_a, high_a = -(1 << (config.input_width - 1)), 1 << (config.input_width - 1)
    job.write(Region.ACTIVATIONS, 0, rng.integers(low_a, high_a, (4, config.rows)))
    low_w, high_w = -(1 << (config.weight_width - 1)), 1 << (config.weight_width - 1)
    job.write(Region.WEIGHTS, 0, rng.integers(low_w, high_w, (config.rows, config.cols)))
    span = 1 << (config.accumulator_width - 4)
    job.write(Region.ACCUMULATORS, 0, rng.integers(-span, span, (12, config.cols)))
    job.read("accumulators", Region.ACCUMULATORS, 0, 12)
    return job
