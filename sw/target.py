"""What a program runs on: the :class:`Target` protocol, the golden model as a Target
(:class:`GoldenTarget`), and the checks that a program or a job was made for the NPU it
is offered to.

Below the runtime (:func:`npugen.run`, :func:`npugen.runtime.open_target`), the driver
(:class:`~npugen.driver.Device`) and the RTL simulation
(:class:`~npugen.sim.runner.RtlTarget`), each a Target, so that none of them needs the
runtime and only the runtime chooses among them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from .config import NpuConfig
from .golden import GoldenNpu
from .job import Job, JobResult, run_golden
from .program import Program

__all__ = ["Target", "GoldenTarget", "ConfigMismatch", "check_config", "check_job",
           "same_image"]


@runtime_checkable
class Target(Protocol):
    """An NPU that keeps a program in its memories and runs jobs on it: :meth:`load` writes
    the program's image once, then each job writes its inputs, runs and reads its outputs
    (:func:`npugen.runtime.program_jobs`: a job a run, or a job a stage of a program in
    stages, each writing its stage's image).

    Implemented by :class:`GoldenTarget`, :class:`~npugen.sim.runner.RtlTarget` and
    :class:`~npugen.driver.Device`; :func:`npugen.runtime.open_target` opens one by name.
    Subclass it to inherit :meth:`execute_many`; an object that has the three methods
    without subclassing is a Target too."""

    def load(self, program: Program) -> None:
        """Write ``program``'s image (instructions, weights, parameters). Raises
        :class:`ConfigMismatch` (a Device: :class:`~npugen.driver.DeviceError`) if the
        program was compiled for another NPU configuration."""
        ...

    def execute(self, job: Job) -> JobResult:
        """Write ``job``'s data, run from its start address, return what it reads."""
        ...

    def execute_many(self, jobs: Sequence[Job]) -> Iterator[JobResult]:
        """Run ``jobs`` in order, each on what the ones before left, and yield each result
        as soon as it is known (nothing runs until the iterator is consumed). This default
        runs one :meth:`execute` after another; a target that pays for each call (the RTL:
        a simulator process) runs several jobs a call."""
        for job in jobs:
            yield self.execute(job)


def same_image(a: Program, b: Program) -> bool:
    """Whether two programs write the same images (instructions, weights, parameters; of
    every stage)."""
    if a is b:
        return True
    images_a, images_b = a.images(), b.images()
    return a.config == b.config and len(images_a) == len(images_b) and all(
        len(one) == len(other) and all(
            ra == rb and ea == eb and np.array_equal(va, vb)
            for (ra, ea, va), (rb, eb, vb) in zip(one, other, strict=True))
        for one, other in zip(images_a, images_b, strict=True))


class ConfigMismatch(ValueError):
    """A program compiled for one NpuConfig, offered to an NPU of another."""


def _differences(made_for: NpuConfig, npu: NpuConfig, what: str) -> str:
    return ", ".join(f"{name}: {what} {getattr(made_for, name)!r}, NPU {getattr(npu, name)!r}"
                     for name in NpuConfig.field_names()
                     if getattr(made_for, name) != getattr(npu, name))


def check_config(program: Program, config: NpuConfig | None) -> None:
    """Raise :class:`ConfigMismatch` listing the fields that differ if ``config`` (the
    target NPU's, when known) is not the one ``program`` was compiled for."""
    if config is not None and config != program.config:
        raise ConfigMismatch(f"the program was compiled for another NPU configuration "
                             f"({_differences(program.config, config, 'program')}); "
                             f"recompile it for this NPU")


def check_job(job: Job, config: NpuConfig) -> None:
    """Raise :class:`ConfigMismatch` listing the fields that differ if ``job`` was made
    for another NPU configuration than ``config``."""
    if job.config != config:
        raise ConfigMismatch(f"the job was made for another NPU configuration "
                             f"({_differences(job.config, config, 'job')}); make it for "
                             f"this NPU")


class GoldenTarget(Target):
    """The golden model (:class:`~npugen.golden.GoldenNpu`) as a :class:`Target`: one
    model whose memories persist from job to job, as a device's do; each result's counters
    are the cycle model's.

    ``config``: the NPU modelled."""

    def __init__(self, config: NpuConfig) -> None:
        self.config = config
        self.npu = GoldenNpu(config)
        self.loaded: Program | None = None   # the program whose image was written last

    def load(self, program: Program) -> None:
        """Write ``program``'s image into the model's memories; :class:`ConfigMismatch`
        if it was compiled for another configuration."""
        check_config(program, self.config)
        for region, entry, values in program.segments:
            self.npu.write(region, entry, values)
        self.loaded = program

    def execute(self, job: Job) -> JobResult:
        """Run ``job`` on the model (:func:`~npugen.job.run_golden`); raises
        :class:`ConfigMismatch` if it was made for another configuration and
        :class:`~npugen.golden.ProgramError` if it cannot run."""
        check_job(job, self.config)
        return run_golden(job, self.npu)
