"""Amaranth gateware of the NPU (imports Amaranth; ``import npugen`` does not)."""

from .array import SystolicArray
from .hostbus import HostBus
from .npu import Npu
from .pe import ProcessingElement
from .requant import Requantizer

__all__ = ["Npu", "SystolicArray", "ProcessingElement", "Requantizer", "HostBus"]
