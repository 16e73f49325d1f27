"""Built-in models: mlpnet, mlp, mnist_cnn, resnet20 and any torchvision classifier."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from wfcore import hookimpl
from wfcore.errors import ConfigError


class MLPNet(nn.Module):
    """784-40-20-10 with ReLU: the WoodFisher paper's MNIST network."""

    def __init__(self, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 40)
        self.fc2 = nn.Linear(40, 20)
        self.fc3 = nn.Linear(20, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class MLP(nn.Module):
    """Linear layers of the given hidden widths with ReLU between them."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int = 10):
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


@dataclass
class MLPOptions:
    hidden: list[int] = field(default_factory=lambda: [300, 100])  # LeNet-300-100 by default

    def validate(self) -> None:
        if any(w < 1 for w in self.hidden):
            raise ValueError(f"hidden widths must be >= 1, got {self.hidden}")


def mlp(options: MLPOptions, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return MLP(math.prod(input_shape), list(options.hidden), num_classes)


mlp.Options = MLPOptions


class MnistCNN(nn.Module):
    """conv 1->16 5x5, ReLU, maxpool 2, conv 16->32 5x5, ReLU, maxpool 2, linear 512->10."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016): 3 stages of 3 basic blocks, 16/32/64 planes."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, depth: int = 20):
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError("model.options.depth must be 6n+2 (20, 32, 44, 56, ...)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(torch.flatten(out, 1))


@dataclass
class ResNet20Options:
    depth: int = 20  # 6n+2: 20, 32, 44, 56


def mlpnet(options, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return MLPNet(math.prod(input_shape), num_classes)


def mnist_cnn(options, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    if tuple(input_shape[1:]) != (28, 28):
        raise ConfigError(f"model 'mnist_cnn' needs 28x28 inputs, the data gives {input_shape}")
    return MnistCNN(input_shape[0], num_classes)


def resnet20(options: ResNet20Options, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return ResNet20(input_shape[0], num_classes, options.depth)


resnet20.Options = ResNet20Options


def torchvision_model(options, num_classes: int, input_shape: tuple[int, ...], target: str):
    """Any torchvision classifier by name, randomly initialised (no weights are downloaded)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if target not in names:
        raise ConfigError(f"model.name: torchvision has no classifier '{target}'")
    return torchvision.models.get_model(target, weights=None, num_classes=num_classes)


@hookimpl
def wfcore_models():
    return {
        "mlpnet": mlpnet,
        "mlp": mlp,
        "mnist_cnn": mnist_cnn,
        "resnet20": resnet20,
        "torchvision:": torchvision_model,
    }
