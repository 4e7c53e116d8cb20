"""What a program runs on: the :class:`Target` protocol, and the check that a program was
compiled for the NPU it is offered to.

Below both the runtime (:func:`npugen.run`) and the driver (:class:`~npugen.driver.Device`,
a Target), so that the driver needs nothing of the runtime.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .config import NpuConfig
from .job import Job, JobResult
from .program import Program

__all__ = ["Target", "ConfigMismatch", "check_config"]


@runtime_checkable
class Target(Protocol):
    """An NPU that runs jobs and keeps its memories between them: an open
    :class:`~npugen.driver.Device`. :func:`npugen.run` gives a Target its inputs only, not
    the program's image: load the program on it first (``Device.load``)."""

    def execute(self, job: Job) -> JobResult:
        """Write ``job``'s data, run from its start address, return what it reads."""
        ...


class ConfigMismatch(ValueError):
    """A program compiled for one NpuConfig, offered to an NPU of another."""


def check_config(program: Program, config: NpuConfig | None) -> None:
    """Raise :class:`ConfigMismatch` listing the fields that differ if ``config`` (the
    target NPU's, when known) is not the one ``program`` was compiled for."""
    if config is not None and config != program.config:
        differences = ", ".join(
            f"{name}: program {getattr(program.config, name)!r}, NPU {getattr(config, name)!r}"
            for name in NpuConfig.field_names()
            if getattr(program.config, name) != getattr(config, name))
        raise ConfigMismatch(f"the program was compiled for another NPU configuration "
                             f"({differences}); recompile it for this NPU")
