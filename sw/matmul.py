"""``Y = A·W (+ bias)`` on the NPU: checks the operands, builds the job, reads Y back."""

from __future__ import annotations

import numpy as np

from .config import NpuConfig
from .isa import Instruction, Opcode, encode_program
from .job import Job, JobResult
from .memory_map import Region
from .schedule import (
    DoesNotFit,
    GemmPlan,
    gemm_instructions,
    plan_gemm,
    tile_activations,
    tile_weights,
    untile_accumulators,
)

__all__ = ["matmul_job", "matmul_output", "check_operands"]


def _check_integers(name: str, array: np.ndarray, width: int, ndim: int) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, not of shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers (int{width}), not {array.dtype}")
    low, high = -(1 << (width - 1)), (1 << (width - 1)) - 1
    if array.size and (array.min() < low or array.max() > high):
        raise ValueError(f"{name} values must fit int{width} ({low} to {high}); "
                         f"found {array.min()} to {array.max()}")
    return array.astype(np.int64)


def check_operands(config: NpuConfig, a, w, bias=None):
    """Validate A (M×K), W (K×N), bias (N): dtypes, value ranges and shapes."""
    a = _check_integers("A", a, config.input_width, 2)
    w = _check_integers("W", w, config.weight_width, 2)
    if a.shape[1] != w.shape[0]:
        raise ValueError(f"A is {a.shape[0]}x{a.shape[1]} and W is {w.shape[0]}x{w.shape[1]}: "
                         f"A's columns ({a.shape[1]}) must equal W's rows ({w.shape[0]})")
    if 0 in a.shape or 0 in w.shape:
        raise ValueError(f"A ({a.shape}) and W ({w.shape}) must not be empty")
    if bias is not None:
        bias = _check_integers("bias", bias, config.accumulator_width, 1)
        if bias.shape != (w.shape[1],):
            raise ValueError(f"bias must have N={w.shape[1]} values, not {bias.shape[0]}")
    return a, w, bias


def matmul_job(config: NpuConfig, a, w, bias=None) -> tuple[Job, GemmPlan]:
    """The job computing ``A·W (+ bias)``, with its plan; raises ``ValueError`` or
    :class:`~npugen.schedule.DoesNotFit` for bad operands."""
    a, w, bias = check_operands(config, a, w, bias)
    plan = plan_gemm(config, a.shape[0], a.shape[1], w.shape[1])
    program = gemm_instructions(plan, accumulate_first=bias is not None)
    program.append(Instruction(Opcode.HALT))
    if len(program) > config.instruction_depth:
        raise DoesNotFit(
            f"M={plan.m} K={plan.k} N={plan.n} needs {len(program)} instructions, "
            f"instruction_depth is {config.instruction_depth} "
            f"({len(program) - config.instruction_depth} too many)")
    job = Job(config)
    job.write(Region.INSTRUCTIONS, 0, encode_program(program))
    job.write(Region.ACTIVATIONS, plan.act_base, tile_activations(plan, a))
    job.write(Region.WEIGHTS, plan.weight_base, tile_weights(plan, w))
    if bias is not None:
        padded = np.zeros(plan.n_tiles * config.cols, dtype=np.int64)
        padded[:plan.n] = bias
        rows = np.repeat(padded.reshape(plan.n_tiles, 1, config.cols), plan.m, axis=1)
        job.write(Region.ACCUMULATORS, plan.acc_base, rows.reshape(-1, config.cols))
    job.read("y", Region.ACCUMULATORS, plan.acc_base, plan.accumulator_words)
    return job, plan


def matmul_output(plan: GemmPlan, result: JobResult) -> np.ndarray:
    """Y (M×N, int32) from a run of :func:`matmul_job`'s job: its accumulator words,
    untiled by ``plan``."""
    return untile_accumulators(plan, result.outputs["y"]).astype(np.int32)
