"""Seeded samples of a training split: the calibration batch that the update safeguard
scores candidates on, and the samples the running statistics are re-estimated from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, default_collate

from wfcore.interfaces import dataset_size


@dataclass
class CalibrationBatch:
    """Samples of the training split that score candidate updates."""

    x: torch.Tensor  # (k, *input)
    y: torch.Tensor | None  # (k,) data labels; None for unlabelled data
    indices: torch.Tensor  # (k,) their indices in the training split given


def calibration_batch(train: Dataset, size: int, seed: int,
                      device: torch.device | str = "cpu") -> CalibrationBatch:
    """``size`` samples of ``train`` (all of it if smaller), in a seeded random order."""
    order = torch.randperm(dataset_size(train), generator=torch.Generator().manual_seed(seed))
    indices = order[:size]
    batch = default_collate([train[int(i)] for i in indices])
    if torch.is_tensor(batch):
        return CalibrationBatch(batch.to(device), None, indices)
    y = batch[1].to(device) if len(batch) > 1 else None
    return CalibrationBatch(batch[0].to(device), y, indices)
