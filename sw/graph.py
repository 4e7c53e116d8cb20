"""The model as the compiler sees it: a chain of dense layers with clamp activations.

Importers (ONNX, ``.npz``) produce a :class:`Model`; layers may carry float weights (to be
quantized from calibration data) or pre-quantized ones (QDQ models), and tensors may carry
the quantization an imported model prescribes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["QuantParams", "Dense", "Model", "ModelError"]


class ModelError(ValueError):
    """A model npugen cannot take: the message names the node or layer and the reason."""


@dataclass(frozen=True)
class QuantParams:
    """Affine quantization ``real = scale · (q − zero_point)``; per-channel if arrays."""

    scale: np.ndarray | float
    zero_point: np.ndarray | int = 0

    def quantize(self, values: np.ndarray, bits: int = 8) -> np.ndarray:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = np.round(np.asarray(values, dtype=np.float64) / self.scale) + self.zero_point
        return np.clip(q, low, high).astype(np.int64)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((np.asarray(q, dtype=np.float64) - self.zero_point) * self.scale).astype(
            np.float32)


class WeightShape:
    """``in_features``/``out_features`` of a layer with a (K, N) ``weight``."""

    weight: np.ndarray

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]


@dataclass
class Dense(WeightShape):
    """``y = clamp(x · weight + bias, low, high)`` with weight (K, N).

    ``low``/``high`` are the activation's float bounds (ReLU: 0, ∞; ReLU6: 0, 6).
    Pre-quantized layers also carry ``quantized_weight`` (int8, K×N), ``weight_quant``
    (per-channel scales, zero points 0) and ``quantized_bias`` (int32).
    """

    name: str
    weight: np.ndarray
    bias: np.ndarray
    low: float = -np.inf
    high: float = np.inf
    quantized_weight: np.ndarray | None = None
    weight_quant: QuantParams | None = None
    quantized_bias: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        y = x.astype(np.float64) @ self.weight.astype(np.float64) + self.bias
        return np.clip(y, self.low, self.high).astype(np.float32)


@dataclass
class Model:
    """A chain of dense layers from one input to one output.

    ``tensor_quant`` holds the quantization a QDQ model prescribes for the input
    (key ``"input"``) and for each layer's output (key: the layer's name).
    """

    layers: list[Dense]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_name: str = "input"
    output_name: str = "output"
    tensor_quant: dict[str, QuantParams] = field(default_factory=dict)

    @property
    def prequantized(self) -> bool:
        return bool(self.tensor_quant)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Float inference: x has a leading batch dimension and ``input_shape``."""
        x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        for layer in self.layers:
            x = layer.forward(x)
        return x.reshape((len(x), *self.output_shape))

    def check(self) -> None:
        """Shapes chain, values are finite."""
        features = int(np.prod(self.input_shape))
        for layer in self.layers:
            if layer.in_features != features:
                raise ModelError(f"layer {layer.name!r} takes {layer.in_features} features but "
                                 f"receives {features}")
            for what, values in (("weights", layer.weight), ("bias", layer.bias)):
                if not np.all(np.isfinite(values)):
                    raise ModelError(f"layer {layer.name!r} has NaN or infinite {what}")
            features = layer.out_features
        if not self.layers:
            raise ModelError("the model has no layer the NPU computes (Gemm or MatMul)")
        if int(np.prod(self.output_shape)) != features:
            raise ModelError(f"the model's output shape {self.output_shape} does not match "
                             f"its last layer's {features} features")
