"""The loop of a run: a plan driven epoch by epoch, with a checkpoint after every epoch
and every pruning step (``wfcore.checkpoint``), so that a run resumes exactly.

Ctrl-C and SIGTERM end the run with a valid checkpoint; the CLI prints how to resume.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from omegaconf import OmegaConf

from wfcore import checkpoint, distributed, files, structured_run
from wfcore import config as config_mod
from wfcore.degenerate import collect_warnings
from wfcore.interfaces import PruneStep, Stateful
from wfcore.report import number
from wfcore.training import Trainer, TrainingDiverged

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torch import nn
    from torch.utils.data import Dataset

    from wfcore.gradients import GradientSampler
    from wfcore.manager import Plugins
    from wfcore.masks import Masks
    from wfcore.report import Report

log = logging.getLogger(__name__)


class PrunedRun(Protocol):
    """What the Runner drives: the model, its masks and how to prune it to a target
    (``wfcore.pipeline.Pruning``). The Runner needs nothing else, and does not import the
    pipeline that uses it."""

    cfg: DictConfig
    run_dir: Any
    plugins: Plugins
    c: Any  # the run's components (estimator, scorer, allocator, scheduler, exporter)
    model: nn.Module
    masks: Masks
    sampler: GradientSampler
    device: torch.device
    loss_fn: nn.Module
    finetune_data: Dataset

    def evaluate(self) -> dict[str, float]: ...

    def restore_dense(self) -> None: ...

    def prune_to(self, target: float, timings: dict[str, float]) -> dict[str, Any]: ...

    def model_state(self) -> dict[str, torch.Tensor]: ...


TIMINGS = ("gradients", "estimate", "prune", "finetune", "evaluate")


class Runner:
    """Runs a plan epoch by epoch, with a checkpoint after every epoch and every step.

    The position in the plan is (step, pruned, step_epochs, epoch): the step in progress,
    whether its pruning is done, its fine-tuning epochs done, and all fine-tuning epochs
    done. One Trainer (optimizer, LR schedule, data order) lives across the steps of a
    schedule; a ``from_dense`` step starts a fresh one.
    """

    def __init__(self, pruning: PrunedRun, plan: list[PruneStep], report: Report,
                 overrides: dict[str, Any]):
        self.p, self.plan, self.report = pruning, plan, report
        self.cfg, self.run_dir = pruning.cfg, pruning.run_dir
        self.digest = checkpoint.config_digest(self.cfg)
        overrides = dict(overrides)
        self.decay_start = int(overrides.pop("lr_decay_start", 0))
        self.lr_key = "scheduler.lr" if overrides.get("lr") is not None else "train.lr"
        self.train_cfg = OmegaConf.merge(self.cfg.train, overrides)
        self.position = {"step": 0, "pruned": False, "step_epochs": 0, "epoch": 0}
        self.timings = dict.fromkeys(TIMINGS, 0.0)
        self.trainer: Trainer | None = None
        self.segment = 0  # the step whose Trainer is live (it seeds the data order)
        self.metrics: dict[str, float] | None = None  # the last epoch's evaluation
        self.saved = (0, 0)  # (epochs, finished steps) of the last checkpoint written

    def segment_epochs(self, first: int) -> int:
        """Fine-tuning epochs from step ``first`` up to the next ``from_dense`` step."""
        epoch, total = 0, 0
        for k, step in enumerate(self.plan):
            pre = max(step.epoch - epoch, 0) if step.epoch is not None else 0
            epoch += pre + step.finetune_epochs
            if k > first and step.from_dense:
                break
            if k >= first:
                total += pre + step.finetune_epochs
        return total

    def make_trainer(self, segment: int) -> Trainer:
        p = self.p
        self.segment = segment
        return Trainer(p.model, p.finetune_data, self.train_cfg,
                       epochs=self.segment_epochs(segment), batch_size=self.cfg.data.batch_size,
                       loss_fn=p.loss_fn, device=p.device, seed=self.cfg.seed + 1000 + segment,
                       masks=p.masks, num_workers=self.cfg.data.num_workers,
                       decay_start=self.decay_start, desc="fine-tune", lr_key=self.lr_key)

    # -- checkpoints ------------------------------------------------------------------
    def stateful(self) -> dict[str, Any]:
        """The run's components that hold random state (``interfaces.Stateful``)."""
        c = self.p.c
        made = {"estimator": c.estimator, "scorer": c.scorer, "allocator": c.allocator,
                "scheduler": c.scheduler}
        return {s: comp for s, comp in made.items() if isinstance(comp, Stateful)}

    def save(self) -> None:
        if distributed.is_main():  # rank 0 alone writes; every rank passes here in step
            trainer = None
            if self.trainer is not None:
                trainer = {"segment": self.segment, **self.trainer.state_dict()}
            checkpoint.save(
                self.run_dir, digest=self.digest,
                position={**self.position, "timings": dict(self.timings)},
                model=self.p.model_state(), masks=self.p.masks.state_dict(), trainer=trainer,
                sampler=self.p.sampler.state_dict(), report=self.report.data,
                components={section: c.state_dict() for section, c in self.stateful().items()})
        self.saved = (self.position["epoch"], self.position["step"])

    def restore(self, state: dict[str, Any]) -> None:
        position = dict(state["position"])
        self.timings = position.pop("timings")
        self.position = position
        structured_run.restore(self.p, state["model"])  # a shrunk architecture first
        self.p.model.load_state_dict(state["model"])
        self.p.masks.load_state_dict(state["masks"])
        self.p.sampler.load_state_dict(state["sampler"])
        saved_components = state.get("components", {})
        for section, component in self.stateful().items():
            if section in saved_components:
                component.load_state_dict(saved_components[section])
        self.report.data = state["report"]
        self.report.data["config"] = config_mod.to_dict(self.cfg)  # output may have moved
        if state["trainer"] is not None:
            saved = dict(state["trainer"])
            self.trainer = self.make_trainer(int(saved.pop("segment")))
            self.trainer.load_state_dict(saved)
        checkpoint.set_rng_state(state["rng"])
        self.saved = (position["epoch"], position["step"])
        log.info("resumed %s at step %d, epoch %d", self.run_dir, position["step"],
                 position["epoch"])

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        """Run the rest of the plan. Ctrl-C or SIGTERM ends it with a KeyboardInterrupt that
        says how to resume; the last checkpoint (atomic) stays valid.
        """
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            while self.position["step"] < len(self.plan):
                self.run_step(self.plan[self.position["step"]])
        except KeyboardInterrupt:
            epochs, steps = self.saved
            raise KeyboardInterrupt(
                f"the last checkpoint holds {epochs} fine-tuning epoch(s) and {steps} "
                f"finished step(s); resume with: wfcore prune --resume {self.run_dir}") from None
        except files.WriteError as exc:
            raise files.WriteError(f"{exc}; the last checkpoint is whole: resume with "
                                   f"wfcore prune --resume {self.run_dir} once it can be "
                                   "written") from None
        except TrainingDiverged as exc:
            raise TrainingDiverged(f"{exc} and start over with --force (the last checkpoint "
                                   "is from before this epoch: --resume would diverge again)"
                                   ) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if self.trainer is not None:
                self.trainer.close()

    def run_epoch(self, step: PruneStep, in_step: bool) -> None:
        if self.trainer is None:
            self.trainer = self.make_trainer(self.position["step"])
        start = time.perf_counter()
        lr = self.trainer.lr()
        train_loss = self.trainer.run_epoch()
        self.timings["finetune"] += time.perf_counter() - start
        start = time.perf_counter()
        self.metrics = self.p.evaluate()
        self.timings["evaluate"] += time.perf_counter() - start
        pos = self.position
        pos["epoch"] += 1
        pos["step_epochs"] += int(in_step)
        record = {"epoch": pos["epoch"], "step": step.index, "lr": lr, "train_loss": train_loss,
                  "accuracy": self.metrics["accuracy"], "loss": self.metrics["loss"],
                  "sparsity": self.p.masks.sparsity()}
        self.report.add_epoch(record)
        log.info("epoch %d: sparsity %.4f, lr %.3g, train loss %.4f, top-1 %s, loss %s",
                 pos["epoch"], record["sparsity"], lr, train_loss,
                 number(record["accuracy"], ".4f"), number(record["loss"], ".4f"))
        if not (in_step and pos["step_epochs"] == step.finetune_epochs):
            self.save()  # (the step's last epoch is saved with the step's record, at once)

    def run_step(self, step: PruneStep) -> None:
        pos, p = self.position, self.p
        self.p.plugins.hook.wfcore_step_start(step=step, run_dir=str(self.run_dir),
                                              options=self.p.c.hooks)
        if not pos["pruned"]:
            while step.epoch is not None and pos["epoch"] < step.epoch:
                self.run_epoch(step, in_step=False)
            if step.from_dense:
                p.restore_dense()
                if self.trainer is not None:
                    self.trainer.close()
                self.trainer = None
            with collect_warnings() as warned:  # into the step's record (report.md too)
                pos["safeguard"] = [p.prune_to(target, self.timings) for target in step.substeps]
            pos["warnings"] = warned
            if self.trainer is not None and self.cfg.structure.unit in ("channel", "head"):
                self.trainer = structured_run.rebuilt_trainer(self, self.trainer)  # new tensors
            if self.trainer is not None:  # no momentum may revive a pruned weight
                p.masks.zero_optimizer_state(self.trainer.optimizer)
            pos["pruned"], self.metrics = True, None
            self.save()
        while pos["step_epochs"] < step.finetune_epochs:
            self.run_epoch(step, in_step=True)
        metrics = self.metrics
        if metrics is None:
            start = time.perf_counter()
            metrics = p.evaluate()
            self.timings["evaluate"] += time.perf_counter() - start
        record = {"index": step.index, "target_sparsity": step.target_sparsity,
                  "sparsity": p.masks.sparsity(), "accuracy": metrics["accuracy"],
                  "loss": metrics["loss"], "epoch": pos["epoch"],
                  "safeguard": pos.pop("safeguard", []), "warnings": pos.pop("warnings", []),
                  "timings": {k: round(v, 4) for k, v in self.timings.items()},
                  "layers": p.masks.layer_sparsity()}
        if distributed.is_main():
            files.save_torch(self.run_dir / f"model_step{step.index}.pt", p.model_state())
        self.report.add_step(record)
        log.info("step %d: sparsity %.4f (target %.4f), top-1 %s, loss %s", step.index,
                 record["sparsity"], step.target_sparsity, number(record["accuracy"], ".4f"),
                 number(record["loss"], ".4f"))
        pos.update(step=pos["step"] + 1, pruned=False, step_epochs=0)
        self.timings, self.metrics = dict.fromkeys(TIMINGS, 0.0), None
        self.save()
        p.plugins.hook.wfcore_step_end(step=step, record=record, run_dir=str(self.run_dir),
                                       options=p.c.hooks)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
