"""Training, fine-tuning under masks, and evaluation.

``Trainer`` holds what lives across epochs (optimizer, learning-rate schedule, the data
order's generator) so that a run can be driven one epoch at a time, checkpointed and
resumed exactly; ``train`` is the plain loop over it used for dense training.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from wfcore import distributed
from wfcore.errors import WfcoreError
from wfcore.interfaces import Loss
from wfcore.masks import Masks

log = logging.getLogger(__name__)


class TrainingDiverged(WfcoreError):
    """The training loss became NaN or inf."""


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
    loss_fn: Loss,
    device: torch.device,
    desc: str = "train",
    lr_key: str = "train.lr",
) -> float:
    """One epoch; returns the mean training loss. A NaN or inf loss raises
    TrainingDiverged naming the epoch (``desc``) and the learning rate (``lr_key``)."""
    model.train()
    total, count = 0.0, 0
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, delay=1):
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if not math.isfinite(loss.item()):
            lr = optimizer.param_groups[0]["lr"]
            raise TrainingDiverged(f"{desc}: the training loss is {loss.item()} at learning "
                                   f"rate {lr:g}; lower {lr_key}")
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
        count += len(x)
    return total / max(count, 1)


class Trainer:
    """Training driven one epoch at a time, with state that can be saved and restored.

    ``epochs`` sizes the LR schedule (cosine anneals over ``epochs - decay_start``);
    the LR stays at ``train.lr`` for the first ``decay_start`` epochs. With ``masks``,
    pruned weights get no gradient and are re-zeroed after every optimizer step. Under
    torchrun the model trains as DistributedDataParallel on each rank's share of the data
    (a DistributedSampler seeded with ``seed``, reshuffled per epoch); ``batch_size`` is
    per process. ``shard=False`` trains in this process alone (rank 0's dense model).
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        train_cfg,
        *,
        epochs: int,
        batch_size: int,
        loss_fn: Loss,
        device: torch.device,
        seed: int,
        masks: Masks | None = None,
        num_workers: int = 0,
        decay_start: int = 0,
        desc: str = "train",
        lr_key: str = "train.lr",
        shard: bool = True,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.device = device
        self.masks = masks
        self.decay_start = decay_start
        self.desc = desc
        self.lr_key = lr_key  # the config key of the learning rate, for error messages
        self.generator = torch.Generator().manual_seed(seed)  # the data order
        self.net: nn.Module = model  # what the batches go through (DDP under torchrun)
        self.sampler: DistributedSampler | None = None
        if shard and distributed.world() > 1:  # each rank its share of a seeded order, per epoch
            self.sampler = DistributedSampler(dataset, num_replicas=distributed.world(),
                                              rank=distributed.rank(), shuffle=True, seed=seed)
            self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler,
                                     num_workers=num_workers)
            self.net = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                     num_workers=num_workers, generator=self.generator)
        self.optimizer = make_optimizer(model, train_cfg)
        self.schedule = make_lr_schedule(self.optimizer, train_cfg, max(epochs - decay_start, 1))
        self.epochs_done = 0
        if masks is not None:
            masks.attach(self.optimizer)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def run_epoch(self) -> float:
        """Train one epoch, then step the LR schedule; returns the mean training loss."""
        if self.sampler is not None:
            self.sampler.set_epoch(self.epochs_done)
        loss = train_epoch(self.net, self.loader, self.optimizer, self.loss_fn, self.device,
                           desc=f"{self.desc} epoch {self.epochs_done + 1}",
                           lr_key=self.lr_key)
        if self.sampler is not None:  # as many samples on every rank: the mean of the means
            loss = distributed.sum_float(loss) / distributed.world()
        self.epochs_done += 1
        if self.epochs_done > self.decay_start:
            self.schedule.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain containers only (loadable with weights_only=True)."""
        return {"optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.schedule.state_dict(),
                "generator": self.generator.get_state(),
                "epochs_done": self.epochs_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["lr_schedule"])
        self.generator.set_state(state["generator"])
        self.epochs_done = int(state["epochs_done"])

    def close(self) -> None:
        """Remove the mask hooks from the model and the optimizer (and DDP's)."""
        if self.masks is not None:
            self.masks.detach()
        self.net = self.model


def train(
    model: nn.Module,
    dataset: Dataset,
    train_cfg,
    *,
    epochs: int,
    batch_size: int,
    loss_fn: Loss,
    device: torch.device,
    seed: int,
    masks: Masks | None = None,
    num_workers: int = 0,
    desc: str = "train",
) -> list[float]:
    """Train for ``epochs`` with a fresh optimizer, in this process alone; masks, when given,
    stay applied."""
    trainer = Trainer(model, dataset, train_cfg, epochs=epochs, batch_size=batch_size,
                      loss_fn=loss_fn, device=device, seed=seed, masks=masks,
                      num_workers=num_workers, desc=desc, shard=False)
    losses = []
    try:
        bar = tqdm(range(epochs), desc=desc, unit="epoch", delay=1)
        for epoch in bar:
            losses.append(trainer.run_epoch())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            log.debug("%s epoch %d/%d: loss %.4f", desc, epoch + 1, epochs, losses[-1])
    finally:
        trainer.close()
    return losses


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    loss_fn: Loss,
    device: torch.device,
    num_workers: int = 0,
) -> dict[str, float | None]:
    """Mean loss and top-1 accuracy on ``dataset``. Top-1 only where it means something:
    targets that are class indices (integers, one per sample) and outputs that are logits
    (n, classes); otherwise (a regression, a data set with a loss of its own) it is None."""
    model.eval()
    loader = DataLoader(dataset, batch_size=max(batch_size, 256), num_workers=num_workers)
    correct: int | None = 0
    total_loss, count = 0.0, 0
    for x, y in tqdm(loader, desc="evaluate", unit="batch", leave=False, delay=1):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += loss_fn(logits, y).item() * len(x)
        if correct is not None and is_classification(logits, y):
            correct += int((logits.argmax(dim=1) == y).sum())
        else:
            correct = None
        count += len(x)
    if count == 0:  # no test set (wfcore.prune without one): nothing to report
        return {"accuracy": None, "loss": None}
    accuracy = None if correct is None else correct / count
    return {"accuracy": accuracy, "loss": total_loss / count}


def is_classification(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    """Whether ``targets`` are class indices of the (n, classes) logits ``outputs``."""
    return (outputs.dim() == 2 and targets.dim() == 1 and len(targets) == len(outputs)
            and not targets.dtype.is_floating_point and not targets.dtype.is_complex
            and targets.dtype != torch.bool)
