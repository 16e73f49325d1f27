"""The loop of a run: a plan driven epoch by epoch, with a checkpoint after every epoch
and every pruning step (``wfcore.run.checkpoint``), so that a run resumes exactly.

Ctrl-C and SIGTERM end the run with a valid checkpoint; the CLI prints how to resume.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from omegaconf import OmegaConf

from wfcore import config as config_mod
from wfcore import distributed, files
from wfcore.choices import STRUCTURED_UNITS
from wfcore.interfaces import PruneStep
from wfcore.run import checkpoint, structured_run
from wfcore.run import directory as rundir
from wfcore.run.degenerate import collect_warnings
from wfcore.run.report import number
from wfcore.run.training import Trainer, TrainingDiverged

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from wfcore.run.report import Report

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What pruning to one target returned: its record (report.json ``steps[].safeguard``:
    the safeguard's choice of damp, alpha and mask, the loss increases, BatchNorm and the
    gradient method) and the seconds each stage took (gradients, estimate, prune)."""

    record: dict[str, Any]
    timings: dict[str, float]


class PrunedRun(Protocol):
    """What the Runner drives: methods on the run's model and masks
    (``wfcore.run.pruning.Pruning``). The Runner reads no attribute of it, and does not import
    the pipeline that uses it."""

    def evaluate(self) -> dict[str, float | None]: ...

    def restore_dense(self) -> None: ...

    def prune_to(self, target: float) -> StepResult: ...

    def trainer(self, train_cfg: DictConfig, *, epochs: int, seed: int, decay_start: int,
                lr_key: str) -> Trainer: ...

    def sparsity(self) -> float: ...

    def layer_sparsity(self) -> dict[str, dict[str, float]]: ...

    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None: ...

    def step_start(self, step: PruneStep) -> None: ...

    def step_end(self, step: PruneStep, record: dict[str, Any]) -> None: ...

    def model_state(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


TIMINGS = ("gradients", "estimate", "prune", "finetune", "evaluate")


class Runner:
    """Runs a plan epoch by epoch, with a checkpoint after every epoch and every step.

    The position in the plan is (step, pruned, step_epochs, epoch): the step in progress,
    whether its pruning is done, its fine-tuning epochs done, and all fine-tuning epochs
    done. One Trainer (optimizer, LR schedule, data order) lives across the steps of a
    schedule; a ``from_dense`` step starts a fresh one.
    """

    def __init__(self, pruning: PrunedRun, plan: list[PruneStep], report: Report,
                 cfg: DictConfig, run_dir: Path, overrides: dict[str, Any]):
        self.p, self.plan, self.report = pruning, plan, report
        self.cfg, self.run_dir = cfg, run_dir
        self.digest = checkpoint.config_digest(self.cfg)
        overrides = dict(overrides)
        self.decay_start = int(overrides.pop("lr_decay_start", 0))
        self.lr_key = "scheduler.lr" if overrides.get("lr") is not None else "train.lr"
        # a DictConfig merged with a dict stays a DictConfig
        self.train_cfg = cast("DictConfig", OmegaConf.merge(self.cfg.train, overrides))
        self.position: dict[str, Any] = {"step": 0, "pruned": False, "step_epochs": 0,
                                         "epoch": 0}
        self.timings = dict.fromkeys(TIMINGS, 0.0)
        # the step in progress once pruned: each target's record and the warnings raised
        self.pruned: list[dict[str, Any]] = []
        self.warned: list[str] = []
        self.trainer: Trainer | None = None
        self.segment = 0  # the step whose Trainer is live (it seeds the data order)
        self.metrics: dict[str, float | None] | None = None  # the last epoch's evaluation
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
        self.segment = segment
        return self.p.trainer(self.train_cfg, epochs=self.segment_epochs(segment),
                              seed=self.cfg.seed + 1000 + segment,
                              decay_start=self.decay_start, lr_key=self.lr_key)

    # -- checkpoints ------------------------------------------------------------------
    def save(self) -> None:
        if distributed.is_main():  # rank 0 alone writes; every rank passes here in step
            trainer = None
            if self.trainer is not None:
                trainer = {"segment": self.segment, **self.trainer.state_dict()}
            position = {**self.position, "timings": dict(self.timings)}
            if self.position["pruned"]:
                position.update(safeguard=self.pruned, warnings=self.warned)
            checkpoint.save(self.run_dir, digest=self.digest, position=position,
                            trainer=trainer, report=self.report.data, **self.p.state_dict())
        self.saved = (self.position["epoch"], self.position["step"])

    def restore(self, state: dict[str, Any]) -> None:
        position = dict(state["position"])
        self.timings = position.pop("timings")
        self.pruned = position.pop("safeguard", [])
        self.warned = position.pop("warnings", [])
        self.position = position
        self.p.load_state_dict(state)
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
                  "sparsity": self.p.sparsity()}
        self.report.add_epoch(record)
        log.info("epoch %d: sparsity %.4f, lr %.3g, train loss %.4f, top-1 %s, loss %s",
                 pos["epoch"], record["sparsity"], lr, train_loss,
                 number(record["accuracy"], ".4f"), number(record["loss"], ".4f"))
        if not (in_step and pos["step_epochs"] == step.finetune_epochs):
            self.save()  # (the step's last epoch is saved with the step's record, at once)

    def run_step(self, step: PruneStep) -> None:
        pos, p = self.position, self.p
        p.step_start(step)
        if not pos["pruned"]:
            while step.epoch is not None and pos["epoch"] < step.epoch:
                self.run_epoch(step, in_step=False)
            if step.from_dense:
                p.restore_dense()
                if self.trainer is not None:
                    self.trainer.close()
                self.trainer = None
            self.pruned = []
            with collect_warnings() as warned:  # into the step's record (report.md too)
                for target in step.substeps:
                    result = p.prune_to(target)
                    self.pruned.append(result.record)
                    for stage, seconds in result.timings.items():
                        self.timings[stage] += seconds
            self.warned = warned
            if self.trainer is not None and self.cfg.structure.unit in STRUCTURED_UNITS:
                self.trainer = structured_run.rebuilt_trainer(self, self.trainer)  # new tensors
            if self.trainer is not None:  # no momentum may revive a pruned weight
                p.zero_optimizer_state(self.trainer.optimizer)
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
                  "sparsity": p.sparsity(), "accuracy": metrics["accuracy"],
                  "loss": metrics["loss"], "epoch": pos["epoch"],
                  "safeguard": self.pruned, "warnings": self.warned,
                  "timings": {k: round(v, 4) for k, v in self.timings.items()},
                  "layers": p.layer_sparsity()}
        if distributed.is_main():
            files.save_torch(rundir.RunDirectory(self.run_dir).step_state(step.index),
                             p.model_state())
        self.report.add_step(record)
        log.info("step %d: sparsity %.4f (target %.4f), top-1 %s, loss %s", step.index,
                 record["sparsity"], step.target_sparsity, number(record["accuracy"], ".4f"),
                 number(record["loss"], ".4f"))
        pos.update(step=pos["step"] + 1, pruned=False, step_epochs=0)
        self.timings, self.metrics = dict.fromkeys(TIMINGS, 0.0), None
        self.pruned, self.warned = [], []
        self.save()
        p.step_end(step, record)


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
