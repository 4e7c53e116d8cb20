"""What the simulators share: the simulated clock, their error, the one config of a job list.

Below :mod:`npugen.sim.runner` (cocotb) and :mod:`npugen.sim.pysim` (Amaranth), so that
neither needs the other.
"""

from __future__ import annotations

from ..config import NpuConfig
from ..job import Job

__all__ = ["CLOCK_PERIOD_NS", "SimulationError", "job_config"]

#: The simulated clock's period, in every simulator and testbench.
CLOCK_PERIOD_NS = 10


class SimulationError(RuntimeError):
    """The simulator failed to build or run."""


def job_config(jobs: list[Job]) -> NpuConfig:
    """The one config of ``jobs`` (not empty); ``ValueError`` if they differ."""
    config = jobs[0].config
    if any(job.config != config for job in jobs):
        raise ValueError("all jobs of one simulation must share one NpuConfig")
    return config
