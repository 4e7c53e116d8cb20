"""The four MLPerf Tiny reference models bundled in ``benchmarks/models/mlperf-tiny/``,
and the NPU that holds them all: one table for the demo, the benchmarks and the tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import NpuConfig

__all__ = ["MlperfModel", "MODELS", "REFERENCE_CONFIG", "model_folder", "model_path"]


@dataclass(frozen=True)
class MlperfModel:
    file: str   #: the .tflite file in :func:`model_folder`
    task: str   #: what it does, and the network
    demo: str   #: its name for ``npugen demo --model``


#: Model key (the models README's column names, lower case) → model.
MODELS = {
    "ad": MlperfModel("ad01_int8.tflite", "anomaly detection (FC autoencoder)", "ad"),
    "ic": MlperfModel("pretrainedResnet_quant.tflite", "image classification (ResNet-8)",
                      "resnet"),
    "kws": MlperfModel("kws_ref_model.tflite", "keyword spotting (DS-CNN)", "kws"),
    "vww": MlperfModel("vww_96_int8.tflite", "visual wake words (MobileNetV1 0.25)", "vww"),
}

#: An 8×8 with memories large enough for every model (the demo's NPU when no
#: configuration is given, and the benchmarks' reference row), its weights in a part per
#: row (a tile loads in a cycle, beside the MATMUL before it: batch-1 dense layers), and
#: the depthwise tap row (a 3×3 depthwise kernel in one pass of the depthwise mode), and
#: the rescale tables (an add's inputs looked up, not requantized).
REFERENCE_CONFIG = NpuConfig(activation_depth=16384, weight_depth=65536,
                             accumulator_depth=1024, instruction_depth=4096, param_depth=512,
                             requant_overlap=True, line_buffer_depth=128, weight_segments=8,
                             depthwise_tap_row=True, rescale_tables=True)


def model_folder() -> Path:
    """``benchmarks/models/mlperf-tiny/`` of the checkout: the models and their README."""
    from .paths import project_root

    return project_root() / "benchmarks" / "models" / "mlperf-tiny"


def model_path(key: str) -> Path:
    """The .tflite file of model ``key`` of :data:`MODELS`.

    Raises ValueError if ``key`` is not one of them, or the file is missing (npugen
    installed without its source tree)."""
    if key not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, not {key!r}")
    path = model_folder() / MODELS[key].file
    if not path.exists():
        raise ValueError(f"{path} is missing: the MLPerf Tiny models come with npugen's "
                         f"source tree (git clone); run from a checkout")
    return path
