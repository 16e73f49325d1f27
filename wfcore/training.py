"""Training, fine-tuning under masks, and evaluation."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from wfcore.masks import Masks

log = logging.getLogger(__name__)


def make_optimizer(model: nn.Module, train) -> torch.optim.Optimizer:
    """The optimizer of the ``train`` config section."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum,
                               weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


def make_lr_schedule(optimizer: torch.optim.Optimizer, train, epochs: int):
    """A per-epoch learning-rate schedule from torch.optim.lr_scheduler."""
    sched = torch.optim.lr_scheduler
    if train.lr_schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if train.lr_schedule == "step":
        return sched.StepLR(optimizer, step_size=train.lr_step, gamma=train.lr_gamma)
    if train.lr_schedule == "exponential":
        return sched.ExponentialLR(optimizer, gamma=train.lr_gamma)
    return sched.ConstantLR(optimizer, factor=1.0, total_iters=0)


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    desc: str = "train",
) -> float:
    """One epoch; returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False):
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{desc}: training loss is {loss.item()}")
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
        count += len(x)
    return total / max(count, 1)


def train(
    model: nn.Module,
    dataset: Dataset,
    train_cfg,
    *,
    epochs: int,
    batch_size: int,
    loss_fn: nn.Module,
    device: torch.device,
    seed: int,
    masks: Masks | None = None,
    num_workers: int = 0,
    desc: str = "train",
) -> list[float]:
    """Train for ``epochs`` with a fresh optimizer; masks, when given, stay applied."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = make_optimizer(model, train_cfg)
    schedule = make_lr_schedule(optimizer, train_cfg, epochs)
    if masks is not None:
        masks.attach(optimizer)
    losses = []
    try:
        bar = tqdm(range(epochs), desc=desc, unit="epoch")
        for epoch in bar:
            losses.append(train_epoch(model, loader, optimizer, loss_fn, device,
                                      desc=f"{desc} {epoch + 1}/{epochs}"))
            schedule.step()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            log.debug("%s epoch %d/%d: loss %.4f", desc, epoch + 1, epochs, losses[-1])
    finally:
        if masks is not None:
            masks.detach()
    return losses


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    loss_fn: nn.Module,
    device: torch.device,
    num_workers: int = 0,
) -> dict[str, float]:
    """Top-1 accuracy and mean loss on ``dataset``."""
    model.eval()
    loader = DataLoader(dataset, batch_size=max(batch_size, 256), num_workers=num_workers)
    correct, total_loss, count = 0, 0.0, 0
    for x, y in tqdm(loader, desc="evaluate", unit="batch", leave=False):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += loss_fn(logits, y).item() * len(x)
        correct += int((logits.argmax(dim=1) == y).sum())
        count += len(x)
    return {"accuracy": correct / max(count, 1), "loss": total_loss / max(count, 1)}
