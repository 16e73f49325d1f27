"""Per-epoch checkpoints of a run, loading them, and the loop that resumes a run exactly.

``Runner`` drives a plan epoch by epoch. A checkpoint (``RUN_DIR/checkpoint.pt``) is
written atomically (temporary file, then rename) after every epoch and every pruning
step, so an interrupted run loses at most the epoch in progress. It holds only tensors
and plain containers and is read back with ``weights_only=True``: the model and masks,
the trainer (optimizer, LR schedule, data-order generator), the position in the pruning
schedule, every RNG state, the report so far, and a digest of the resolved config that
tells a checkpoint of another config apart.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from wfcore import config as config_mod
from wfcore import files
from wfcore.errors import WfcoreError
from wfcore.interfaces import PruneStep
from wfcore.training import Trainer

if TYPE_CHECKING:
    from wfcore.gradients import GradientSampler
    from wfcore.pipeline import Pruning
    from wfcore.report import Report

log = logging.getLogger(__name__)

FILENAME = "checkpoint.pt"
FORMAT = 1
# Keys that may change between a run and its resumption without changing its results.
IGNORED_KEYS = ("output", "cache_dir", "device")


def path(run_dir: str | Path) -> Path:
    return Path(run_dir) / FILENAME


def resumable_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The resolved config less the keys that a resumed run may change."""
    values = config_mod.to_dict(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    return {k: v for k, v in values.items() if k not in IGNORED_KEYS}


def config_digest(cfg: DictConfig | dict[str, Any]) -> str:
    return config_mod.digest(resumable_config(cfg))


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for k, v in values.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: values}


def config_differences(saved: dict[str, Any], cfg: DictConfig | dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    a, b = _flatten(resumable_config(saved)), _flatten(resumable_config(cfg))
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))


# -- RNG states ------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# -- save / load -----------------------------------------------------------------------
def save(run_dir: str | Path, *, digest: str, position: dict[str, Any],
         model: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
         trainer: dict[str, Any] | None, sampler: dict[str, Any],
         report: dict[str, Any]) -> Path:
    """Write the checkpoint atomically; every argument must be tensors or plain values."""
    payload = {
        "format": FORMAT,
        "digest": digest,
        "position": position,
        "model": model,
        "masks": masks,
        "trainer": trainer,
        "sampler": sampler,  # the gradient sampler's generator and data position
        "rng": rng_state(),
        "report": report,
    }
    return files.save_torch(path(run_dir), payload)


def require(run_dir: str | Path) -> Path:
    """The checkpoint file of ``run_dir``; a one-line error when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise WfcoreError(f"--resume {run_dir}: no checkpoint: the directory does not exist")
    file = path(run_dir)
    if not file.is_file():
        raise WfcoreError(f"--resume {run_dir}: no checkpoint in this directory "
                          f"({FILENAME} is missing)")
    return file


def load(run_dir: str | Path, cfg: DictConfig) -> dict[str, Any]:
    """The checkpoint of ``run_dir`` if it was written by a run of ``cfg``.

    Raises a one-line WfcoreError when there is none, it cannot be read, or it comes from
    a different config (naming the keys that differ).
    """
    run_dir = Path(run_dir)
    where = f"--resume {run_dir}"
    file = require(run_dir)
    try:
        state = files.load_torch(file)
    except Exception as exc:
        raise WfcoreError(f"{where}: cannot read {file}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise WfcoreError(f"{where}: {file} is not a wfcore checkpoint (format {FORMAT})")
    digest = config_digest(cfg)
    if state["digest"] != digest:
        saved = state.get("report", {}).get("config", {})
        keys = config_differences(saved, cfg) if saved else []
        which = f" (differs in {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})" \
            if keys else ""
        raise WfcoreError(f"{where}: the checkpoint is from a different config{which}; "
                          "resume with the run's own config.yaml, or start over with --force")
    return state


TIMINGS = ("gradients", "estimate", "prune", "finetune", "evaluate")


class Runner:
    """Runs a plan epoch by epoch, with a checkpoint after every epoch and every step.

    The position in the plan is (step, pruned, step_epochs, epoch): the step in progress,
    whether its pruning is done, its fine-tuning epochs done, and all fine-tuning epochs
    done. One Trainer (optimizer, LR schedule, data order) lives across the steps of a
    schedule; a ``from_dense`` step starts a fresh one.
    """

    def __init__(self, pruning: Pruning, plan: list[PruneStep], report: Report,
                 overrides: dict[str, Any]):
        self.p, self.plan, self.report = pruning, plan, report
        self.cfg, self.run_dir = pruning.cfg, pruning.run_dir
        self.digest = config_digest(self.cfg)
        overrides = dict(overrides)
        self.decay_start = int(overrides.pop("lr_decay_start", 0))
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
        return Trainer(p.model, p.data.train, self.train_cfg,
                       epochs=self.segment_epochs(segment), batch_size=self.cfg.data.batch_size,
                       loss_fn=p.loss_fn, device=p.device, seed=self.cfg.seed + 1000 + segment,
                       masks=p.masks, num_workers=self.cfg.data.num_workers,
                       decay_start=self.decay_start, desc="fine-tune")

    # -- checkpoints ------------------------------------------------------------------
    def save(self) -> None:
        trainer = None
        if self.trainer is not None:
            trainer = {"segment": self.segment, **self.trainer.state_dict()}
        save(self.run_dir, digest=self.digest,
             position={**self.position, "timings": dict(self.timings)},
             model=self.p.model_state(), masks=self.p.masks.state_dict(), trainer=trainer,
             sampler=sampler_state(self.p.sampler), report=self.report.data)
        self.saved = (self.position["epoch"], self.position["step"])

    def restore(self, state: dict[str, Any]) -> None:
        position = dict(state["position"])
        self.timings = position.pop("timings")
        self.position = position
        self.p.model.load_state_dict(state["model"])
        self.p.masks.load_state_dict(state["masks"])
        load_sampler_state(self.p.sampler, state["sampler"])
        self.report.data = state["report"]
        self.report.data["config"] = config_mod.to_dict(self.cfg)  # output may have moved
        if state["trainer"] is not None:
            saved = dict(state["trainer"])
            self.trainer = self.make_trainer(int(saved.pop("segment")))
            self.trainer.load_state_dict(saved)
        set_rng_state(state["rng"])
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
        log.info("epoch %d: sparsity %.4f, lr %.3g, train loss %.4f, top-1 %.4f", pos["epoch"],
                 record["sparsity"], lr, train_loss, record["accuracy"])
        if not (in_step and pos["step_epochs"] == step.finetune_epochs):
            self.save()  # (the step's last epoch is saved with the step's record, at once)

    def run_step(self, step: PruneStep) -> None:
        pos, p = self.position, self.p
        self.p.plugins.hook.wfcore_step_start(step=step, run_dir=str(self.run_dir))
        if not pos["pruned"]:
            while step.epoch is not None and pos["epoch"] < step.epoch:
                self.run_epoch(step, in_step=False)
            if step.from_dense:
                p.restore_dense()
                if self.trainer is not None:
                    self.trainer.close()
                self.trainer = None
            for target in step.substeps:
                p.prune_to(target, self.timings)
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
                  "timings": {k: round(v, 4) for k, v in self.timings.items()},
                  "layers": p.masks.layer_sparsity()}
        files.save_torch(self.run_dir / f"model_step{step.index}.pt", p.model_state())
        self.report.add_step(record)
        log.info("step %d: sparsity %.4f (target %.4f), top-1 %.4f", step.index,
                 record["sparsity"], step.target_sparsity, record["accuracy"])
        pos.update(step=pos["step"] + 1, pruned=False, step_epochs=0)
        self.timings, self.metrics = dict.fromkeys(TIMINGS, 0.0), None
        self.save()
        p.plugins.hook.wfcore_step_end(step=step, record=record, run_dir=str(self.run_dir))


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def sampler_state(sampler: GradientSampler) -> dict[str, Any]:
    """The gradient sampler's random state: its generator and its place in the data."""
    order = getattr(sampler, "_order", None)
    return {"generator": sampler.generator.get_state(), "order": order,
            "pos": int(getattr(sampler, "_pos", 0))}


def load_sampler_state(sampler: GradientSampler, state: dict[str, Any]) -> None:
    sampler.generator.set_state(state["generator"])
    if hasattr(sampler, "_order"):
        sampler._order, sampler._pos = state["order"], state["pos"]
