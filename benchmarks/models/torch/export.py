"""Export two small float networks with ``torch.onnx.export``, as a PyTorch user would:
a DS-CNN-like keyword spotter (NCHW input 1×49×10, ending in a Softmax) and a
ResNet-8-like image classifier (3×32×32, residual Adds, BatchNormalization left unfolded
by the TorchScript exporter). Each with the default exporter of torch 2.13 (dynamo) and
with ``dynamo=False`` (TorchScript). The weights are random (seeded), as npugen checks
what the exporter writes, not accuracy; ``tests/test_onnx_converters.py`` compiles them
with npugen's own calibration.

Run from the repository root (torch and onnxscript are not npugen dependencies):
``pip install torch==2.13.0 onnxscript && python benchmarks/models/torch/export.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class DsCnn(nn.Module):
    """DS-CNN (MLPerf Tiny KWS) in small: a 10×4 stride-2 convolution, two depthwise
    separable blocks, average pooling over the whole map, a linear layer, Softmax."""

    def __init__(self, channels: int = 16, classes: int = 12):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, channels, (10, 4), 2, (5, 1)),
                                   nn.BatchNorm2d(channels), nn.ReLU()]
        for _ in range(2):
            layers += [nn.Conv2d(channels, channels, 3, 1, 1, groups=channels),
                       nn.BatchNorm2d(channels), nn.ReLU(),
                       nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d((25, 5))
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return torch.softmax(self.classifier(torch.flatten(x, 1)), dim=1)


class Block(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = (nn.Identity() if stride == 1 and inputs == outputs
                         else nn.Conv2d(inputs, outputs, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet8(nn.Module):
    """ResNet-8 (MLPerf Tiny IC) in small: a stem, three residual blocks, global average
    pooling, a linear layer (logits)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def randomize_batch_norm(net: nn.Module, generator: torch.Generator) -> None:
    """Running statistics and affine parameters as a trained network has them."""
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            count = module.num_features
            module.running_mean.copy_(torch.randn(count, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(count, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(count, generator=generator) * 0.1)


NETWORKS = {"ds_cnn": (DsCnn, (1, 49, 10)), "resnet8": (ResNet8, (3, 32, 32))}


def export(name: str, dynamo: bool) -> Path:
    make, shape = NETWORKS[name]
    torch.manual_seed(0)
    net = make()
    randomize_batch_norm(net, torch.Generator().manual_seed(1))
    net.eval()
    path = HERE / f"{name}_{'dynamo' if dynamo else 'torchscript'}.onnx"
    example = (torch.zeros(2, *shape),)
    if dynamo:
        program = torch.onnx.export(net, example, dynamo=True,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
        program.save(str(path))
    else:
        torch.onnx.export(net, example, str(path), input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"},
                                                                 "output": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return path


if __name__ == "__main__":
    print(f"torch {torch.__version__}")
    for network in NETWORKS:
        for use_dynamo in (True, False):
            print(export(network, use_dynamo).name)
