"""Small models of the architectures users bring, trained in seconds on the embedded MNIST
subset: ``bn_cnn`` (residual blocks with BatchNorm), ``vit_tiny`` (a vision transformer
of ``nn.TransformerEncoderLayer``s, attention through ``nn.MultiheadAttention``) and
``mobilenet_tiny`` (depthwise-separable convolutions with BatchNorm). The robustness
table and the tests prune them beside the paper's MLPNet and mnist_cnn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from wfcore.plugins.models import BasicBlock

from wfcore import ConfigError, declare_options, hookimpl


class ResidualBNCNN(nn.Module):
    """A small residual CNN with BatchNorm: a 3x3 stem of ``width`` channels, one basic
    block at that width and one at twice it (stride 2, 1x1 projection shortcut), global
    average pooling, linear. The robustness table's BatchNorm model."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@dataclass
class BNCNNOptions:
    width: int = 16  # channels of the stem and the first block (the second has twice)

    def validate(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")


def bn_cnn(options: BNCNNOptions, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    if len(input_shape) != 3:
        raise ConfigError(f"model 'bn_cnn' needs image inputs (C, H, W), the data gives "
                          f"{tuple(input_shape)}")
    return ResidualBNCNN(input_shape[0], num_classes, options.width)


declare_options(bn_cnn, BNCNNOptions)


class TinyViT(nn.Module):
    """A small vision transformer: non-overlapping patches embedded by a strided conv, a
    class token, learned position embeddings, ``depth`` ``nn.TransformerEncoderLayer``s
    (pre-norm, GELU; attention through ``nn.MultiheadAttention``), a linear head."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, patch: int, dim: int,
                 depth: int, heads: int, mlp_ratio: int):
        super().__init__()
        channels, height, width = input_shape
        self.patch_embed = nn.Conv2d(channels, dim, patch, patch)
        tokens = (height // patch) * (width // patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_ratio * dim, dropout=0.0,
                                           activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (batch, tokens, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


@dataclass
class ViTOptions:
    patch: int = 7  # patch side: 28x28 MNIST gives 16 patches
    dim: int = 64  # token width
    depth: int = 2  # encoder layers
    heads: int = 4  # attention heads (dim must divide by it)
    mlp_ratio: int = 2  # hidden width of each MLP, times dim

    def validate(self) -> None:
        if min(self.patch, self.dim, self.depth, self.heads, self.mlp_ratio) < 1:
            raise ValueError("patch, dim, depth, heads and mlp_ratio must be >= 1")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} does not divide into {self.heads} heads")


def vit_tiny(options: ViTOptions, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    if len(input_shape) != 3 or min(input_shape[1:]) < options.patch:
        raise ConfigError(f"model 'vit_tiny' needs image inputs (C, H, W) of at least one "
                          f"{options.patch}x{options.patch} patch, the data gives "
                          f"{tuple(input_shape)}")
    return TinyViT(tuple(input_shape), num_classes, options.patch, options.dim, options.depth,
                   options.heads, options.mlp_ratio)


declare_options(vit_tiny, ViTOptions)


def separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """A MobileNet block: depthwise 3x3 + BatchNorm + ReLU, pointwise 1x1 + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class TinyMobileNet(nn.Module):
    """A MobileNet-style CNN: a 3x3 stem, depthwise-separable blocks, pooling, linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(separable(width, 2 * width, 2),
                                    separable(2 * width, 2 * width, 1),
                                    separable(2 * width, 4 * width, 2),
                                    separable(4 * width, 4 * width, 1))
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def mobilenet_tiny(options: BNCNNOptions, num_classes: int,
                   input_shape: tuple[int, ...]) -> nn.Module:
    if len(input_shape) != 3:
        raise ConfigError(f"model 'mobilenet_tiny' needs image inputs (C, H, W), the data "
                          f"gives {tuple(input_shape)}")
    return TinyMobileNet(input_shape[0], num_classes, options.width)


declare_options(mobilenet_tiny, BNCNNOptions)


@hookimpl
def wfcore_models():
    return {"bn_cnn": bn_cnn, "vit_tiny": vit_tiny, "mobilenet_tiny": mobilenet_tiny}
