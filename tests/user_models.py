"""Models and data as a user writes them, with no plugin: the file specs of tests/test_api.py
(``model.name=tests/user_models.py:build``, ``data.name=tests/user_models.py:digits``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


class Residual(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallCNN(nn.Module):
    """A stem with BatchNorm, one residual block, pooling, a linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.block = Residual(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.block(self.stem(x)), 1), 1))


class SmallTransformer(nn.Module):
    """Rows of an image as tokens: a linear embedding, nn.TransformerEncoder, a head."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, dim: int):
        super().__init__()
        self.embed = nn.Linear(input_shape[-1], dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.flatten(1, -2))  # (batch, C*H, dim)
        return self.head(self.encoder(tokens).mean(1))


def build(num_classes: int, input_shape: tuple[int, ...], width: int = 8) -> nn.Module:
    return SmallCNN(input_shape[0], num_classes, width)


def build_transformer(num_classes: int, input_shape: tuple[int, ...], dim: int = 16) -> nn.Module:
    return SmallTransformer(input_shape, num_classes, dim)


def digits(train_size: int = 256, test_size: int = 128):
    """scikit-learn's 8x8 digits as (train, test) TensorDatasets, standardised."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.as_tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8)
    X = (X - X.mean()) / X.std()
    y = torch.as_tensor(y)
    return (TensorDataset(X[:train_size], y[:train_size]),
            TensorDataset(X[train_size:train_size + test_size],
                          y[train_size:train_size + test_size]))
