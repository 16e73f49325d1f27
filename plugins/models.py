"""Built-in models: mlpnet, mlp, mnist_cnn, resnet20 and any torchvision classifier."""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wfcore import ConfigError, declare_options, first_line, hookimpl

log = logging.getLogger(__name__)


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


declare_options(mlp, MLPOptions)


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


declare_options(resnet20, ResNet20Options)


@dataclass
class TorchvisionOptions:
    # a first conv that takes another number of channels than the data has is replaced by
    # one that takes the data's (e.g. 1-channel MNIST into an RGB network); false: an error
    adapt_channels: bool = True


class FirstLayerFound(Exception):
    """Raised by the tracing hook once the first layer to consume the input is known."""


def first_layer(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Module] | None:
    """The (name, module) of the first layer without children that ``model`` calls on
    ``example`` (None if it calls none). The forward stops there: no layer computes
    anything. An error the model raises before its first layer is raised."""
    names = {m: n for n, m in model.named_modules() if not list(m.children())}

    def stop(module: nn.Module, args: tuple) -> None:
        raise FirstLayerFound(names[module])

    handles = [m.register_forward_pre_hook(stop) for m in names]
    try:
        with torch.no_grad():
            model(example)
    except FirstLayerFound as found:
        name = str(found)
        return name, model.get_submodule(name)
    finally:
        for handle in handles:
            handle.remove()
    return None


def adapt_first_conv(model: nn.Module, name: str, in_channels: int,
                     pretrained: bool = False) -> nn.Conv2d:
    """Replace the Conv2d ``name`` of ``model`` by one taking ``in_channels`` channels:
    its pretrained weights averaged over the input channels and repeated, else freshly
    initialised. Returns the new layer."""
    old = model.get_submodule(name)
    if not isinstance(old, nn.Conv2d):
        raise TypeError(f"'{name}' is a {type(old).__name__}, not a Conv2d")
    # a Conv2d's sizes are typed as its base class's tuple[int, ...]; they are pairs
    sizes: dict[str, Any] = {"kernel_size": old.kernel_size, "stride": old.stride,
                             "padding": old.padding, "dilation": old.dilation}
    new = nn.Conv2d(in_channels, old.out_channels, groups=old.groups,
                    bias=old.bias is not None, padding_mode=old.padding_mode, **sizes)
    if pretrained:
        with torch.no_grad():
            mean = old.weight.mean(dim=1, keepdim=True)  # (out, 1, kh, kw)
            new.weight.copy_(mean.repeat(1, in_channels, 1, 1))  # (out, in_channels, kh, kw)
            if old.bias is not None and new.bias is not None:
                new.bias.copy_(old.bias)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
    return new


def fit_input_channels(model: nn.Module, input_shape: tuple[int, ...], model_name: str,
                       adapt: bool, pretrained: bool = False) -> None:
    """Make the first layer of an image model take the data's channels (see
    ``TorchvisionOptions.adapt_channels``); one-line errors when it cannot."""
    if len(input_shape) != 3:  # only images (C, H, W) have channels to adapt
        return
    channels = input_shape[0]
    try:
        found = first_layer(model, torch.zeros(1, *input_shape))
    except Exception as exc:  # the model's own check of the input, before any layer
        raise ConfigError(f"model.name={model_name} refuses the data's input shape "
                          f"{tuple(input_shape)}: {first_line(exc)}") from None
    if found is None or not isinstance(found[1], nn.Conv2d):
        what = f"'{found[0]}' is a {type(found[1]).__name__}" if found else "none ran"
        raise ConfigError(f"model.name={model_name}: no first Conv2d to fit to the data's "
                          f"{channels} input channels (the first layer: {what})")
    name, conv = found
    if conv.in_channels == channels:
        return
    if not adapt:
        raise ConfigError(f"model.name={model_name} takes {conv.in_channels} input channels, "
                          f"the data has {channels}; set model.options.adapt_channels=true to "
                          "replace its first conv")
    if conv.groups != 1:
        raise ConfigError(f"model.name={model_name}: its first conv '{name}' is grouped "
                          f"({conv.groups} groups) and cannot take {channels} input channels")
    adapt_first_conv(model, name, channels, pretrained)
    log.info("%s: first conv '%s' takes %d input channels instead of %d (%s)", model_name,
             name, channels, conv.in_channels,
             "pretrained weights averaged over them" if pretrained else "freshly initialised")


def torchvision_model(options: TorchvisionOptions, num_classes: int,
                      input_shape: tuple[int, ...], target: str) -> nn.Module:
    """Any torchvision classifier by name, randomly initialised (no weights are downloaded),
    its first conv fitted to the data's channels."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if target not in names:
        raise ConfigError(f"model.name: torchvision has no classifier '{target}'")
    model = torchvision.models.get_model(target, weights=None, num_classes=num_classes)
    fit_input_channels(model, tuple(input_shape), f"torchvision:{target}",
                       options.adapt_channels)
    try:  # one item through the model: an input too small for it fails here, in one line
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except Exception as exc:
        raise ConfigError(f"model.name=torchvision:{target} does not take the data's input "
                          f"shape {tuple(input_shape)}: {first_line(exc)}") from None
    return model.train()


declare_options(torchvision_model, TorchvisionOptions)


@hookimpl
def wfcore_models():
    return {
        "mlpnet": mlpnet,
        "mlp": mlp,
        "mnist_cnn": mnist_cnn,
        "resnet20": resnet20,
        "torchvision:": torchvision_model,
    }
