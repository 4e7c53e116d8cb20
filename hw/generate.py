"""Verilog and a JSON description (config, ISA version, memory map) of one NPU."""

from __future__ import annotations

import json
from pathlib import Path

from amaranth.back import verilog

from ..config import NpuConfig
from ..isa import INSTRUCTION_WIDTH, ISA_VERSION
from ..memory_map import COUNTER_NAMES, MAGIC, REGION_SHIFT, Reg, address, memories
from .npu import Npu

__all__ = ["verilog_text", "description", "generate"]

TOP_NAME = "npu"


def verilog_text(config: NpuConfig) -> str:
    return verilog.convert(Npu(config), name=TOP_NAME, emit_src=False)


def description(config: NpuConfig) -> dict:
    """What a host needs to know about the generated NPU."""
    return {
        "top": TOP_NAME,
        "config": config.to_dict(),
        "config_digest": config.digest(),
        "isa_version": ISA_VERSION,
        "instruction_width": INSTRUCTION_WIDTH,
        "magic": MAGIC,
        "macs_per_cycle": config.macs_per_cycle,
        "host_bus": {"data_width": 32, "region_shift": REGION_SHIFT},
        "registers": {reg.name.lower(): address(0, reg) for reg in Reg},
        "counters": list(COUNTER_NAMES),
        "memories": {
            info.name: {"base": address(region), "depth": info.depth, "width": info.width,
                        "host_words_per_entry": info.stride}
            for region, info in memories(config).items()
        },
    }


def generate(config: NpuConfig, directory: str | Path) -> tuple[Path, Path]:
    """Write ``npu.v`` and ``npu.json`` into ``directory``; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    verilog_path = directory / f"{TOP_NAME}.v"
    json_path = directory / f"{TOP_NAME}.json"
    verilog_path.write_text(verilog_text(config))
    json_path.write_text(json.dumps(description(config), indent=2) + "\n")
    return verilog_path, json_path
