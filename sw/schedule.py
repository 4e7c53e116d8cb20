"""Tiling and scheduling of a GEMM onto the array and memories.

``Y[M, N] = A[M, K] · W[K, N] (+ bias[N])``: K is cut into tiles of ``rows``, N into
tiles of ``cols``. Activation word ``kt·M + m`` holds ``A[m, kt·rows:(kt+1)·rows]``;
weight words ``(nt·KT + kt)·rows + i`` hold row ``kt·rows + i`` of N-tile ``nt``;
accumulator word ``nt·M + m`` receives ``Y[m, nt·cols:(nt+1)·cols]``. Weight tiles
alternate between the two banks, so each LOADW runs under the previous MATMUL.
The model compiler's dense layers on a batch are scheduled with the same functions
(:mod:`npugen.lowering` emits them as plain GEMMs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import NpuConfig
from .isa import Instruction, Opcode

__all__ = ["GemmPlan", "plan_gemm", "gemm_instructions", "tile_activations", "tile_weights",
           "untile_accumulators", "next_bank", "DoesNotFit"]


class DoesNotFit(ValueError):
    """A workload needs more of a memory than the config has."""


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class GemmPlan:
    """Where one GEMM lives in the memories."""

    config: NpuConfig
    m: int
    k: int
    n: int
    act_base: int = 0
    weight_base: int = 0
    acc_base: int = 0

    @property
    def k_tiles(self) -> int:
        return ceil_div(self.k, self.config.rows)

    @property
    def n_tiles(self) -> int:
        return ceil_div(self.n, self.config.cols)

    @property
    def activation_words(self) -> int:
        return self.k_tiles * self.m

    @property
    def weight_words(self) -> int:
        return self.n_tiles * self.k_tiles * self.config.rows

    @property
    def accumulator_words(self) -> int:
        return self.n_tiles * self.m

    @property
    def ideal_cycles(self) -> float:
        return self.m * self.k * self.n / self.config.macs_per_cycle

    def act_addr(self, k_tile: int) -> int:
        return self.act_base + k_tile * self.m

    def weight_addr(self, n_tile: int, k_tile: int) -> int:
        return self.weight_base + (n_tile * self.k_tiles + k_tile) * self.config.rows

    def acc_addr(self, n_tile: int) -> int:
        return self.acc_base + n_tile * self.m


def plan_gemm(config: NpuConfig, m: int, k: int, n: int, *, act_base: int = 0,
              weight_base: int = 0, acc_base: int = 0) -> GemmPlan:
    """Place a GEMM; raise :class:`DoesNotFit` naming each memory that overflows."""
    for name, value in (("M", m), ("K", k), ("N", n)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    plan = GemmPlan(config, m, k, n, act_base, weight_base, acc_base)
    if m > 0xFFFF:
        raise DoesNotFit(f"M={m} rows exceed the 65535 rows one MATMUL can stream")
    problems = []
    for what, used, depth, field in (
        ("activations", act_base + plan.activation_words, config.activation_depth,
         "activation_depth"),
        ("weights", weight_base + plan.weight_words, config.weight_depth, "weight_depth"),
        ("accumulators", acc_base + plan.accumulator_words, config.accumulator_depth,
         "accumulator_depth"),
    ):
        if used > depth:
            problems.append(f"{what} need {used} words, {field} is {depth} "
                            f"({used - depth} too many)")
    if problems:
        raise DoesNotFit(f"M={m} K={k} N={n} does not fit a {config.describe()} NPU: "
                         + "; ".join(problems))
    return plan


def gemm_instructions(plan: GemmPlan, *, accumulate_first: bool = False,
                      first_bank: int = 0) -> list[Instruction]:
    """SETGEMM, then one GEMM per N-tile (each expands into LOADW/MATMUL per K-tile, the
    banks alternating so each weight load runs under the previous stream); no HALT."""
    program = [Instruction(Opcode.SETGEMM, {"weight_addr": plan.weight_addr(0, 0),
                                            "k_tiles": plan.k_tiles, "tile_step": plan.m})]
    for n_tile in range(plan.n_tiles):
        program.append(Instruction(Opcode.GEMM, {
            "bank": first_bank ^ ((n_tile * plan.k_tiles) & 1),
            "accumulate": int(accumulate_first), "act_addr": plan.act_addr(0),
            "acc_addr": plan.acc_addr(n_tile), "count": plan.m}))
    return program


def next_bank(plan: GemmPlan, first_bank: int = 0) -> int:
    """The bank the tile after this GEMM's last one should use."""
    return first_bank ^ ((plan.n_tiles * plan.k_tiles) & 1)


def tile_activations(plan: GemmPlan, a: np.ndarray) -> np.ndarray:
    """A[M, K] as activation words (K-tile major), zero-padded to whole tiles."""
    rows = plan.config.rows
    padded = np.zeros((plan.m, plan.k_tiles * rows), dtype=np.int64)
    padded[:, :plan.k] = a
    return padded.reshape(plan.m, plan.k_tiles, rows).transpose(1, 0, 2).reshape(-1, rows)


def tile_weights(plan: GemmPlan, w: np.ndarray) -> np.ndarray:
    """W[K, N] as weight words, tile by tile, zero-padded."""
    rows, cols = plan.config.rows, plan.config.cols
    padded = np.zeros((plan.k_tiles * rows, plan.n_tiles * cols), dtype=np.int64)
    padded[:plan.k, :plan.n] = w
    tiles = padded.reshape(plan.k_tiles, rows, plan.n_tiles, cols).transpose(2, 0, 1, 3)
    return tiles.reshape(-1, cols)


def untile_accumulators(plan: GemmPlan, words: np.ndarray) -> np.ndarray:
    """Accumulator words back to Y[M, N]."""
    cols = plan.config.cols
    tiles = np.asarray(words).reshape(plan.n_tiles, plan.m, cols).transpose(1, 0, 2)
    return tiles.reshape(plan.m, plan.n_tiles * cols)[:, :plan.n]
