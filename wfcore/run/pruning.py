"""The step of a run: a model pruned to a target sparsity, from a setup built once.

``RunSetup`` (``wfcore.run.prepare``) is what the run is built from: the data, the model with
its dense weights and their provenance, the plan. ``Pruning`` holds what a step changes
(the masks, the gradient sampler, the safeguard, the dense fit kept for later steps) and
offers the methods the Runner drives (``wfcore.run.runner.PrunedRun``): ``prune_to(target)``
returns the step's record and timings (``StepResult``) instead of leaving them anywhere,
and the checkpoint state goes out and comes back through ``state_dict`` and
``load_state_dict``.

Lifecycle of ``prune_to``: gradients -> estimate -> score -> allocate -> update
(safeguarded) -> masks set, BatchNorm statistics refreshed, degeneracy checked.
"""

from __future__ import annotations

import copy
import time
from contextlib import ExitStack
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from wfcore import distributed
from wfcore.choices import STRUCTURED_UNITS
from wfcore.errors import WfcoreError
from wfcore.fisher.gradients import GradientSampler
from wfcore.interfaces import LayerwiseEstimator, PruneStep, PruningProblem, Stateful, Tensors
from wfcore.masks import Masks, block_scores, whole_blocks
from wfcore.nm import nm_keep, parse_pattern
from wfcore.run import structured_run
from wfcore.run.batchnorm import RunningStats
from wfcore.run.degenerate import DegeneracyCheck
from wfcore.run.dense_fit import DenseFit
from wfcore.run.prepare import RunSetup
from wfcore.run.runner import StepResult
from wfcore.run.safeguard import Safeguard, calibration_batch, magnitude_scores
from wfcore.run.training import Trainer, evaluate

STAGES = ("gradients", "estimate", "prune")  # the timed stages of a pruning step


class Pruning:
    """The state a run's steps change, and the step itself (``prune_to``)."""

    def __init__(self, setup: RunSetup):
        self.setup = setup
        cfg, pool = setup.cfg, setup.pool
        self.model = setup.model  # the run's model object: pruned and fine-tuned in place
        self.params = dict(setup.params)  # rebound when channels are removed
        self.masks = Masks(self.params)
        self.pristine: nn.Module | None = None  # the dense architecture (structure.unit: channel)
        bn = cfg.batchnorm  # running statistics re-estimated on the pool (wfcore/run/batchnorm.py)
        self.stats = RunningStats.from_pool(self.model, pool, bn.samples, cfg.seed + 2,
                                            setup.device, enabled=bn.recalibrate,
                                            chunk=cfg.data.batch_size)
        degenerate = cfg.degenerate
        self.degeneracy = DegeneracyCheck(
            calibration_batch(pool, degenerate.probe_samples, cfg.seed + 2, setup.device).x,
            degenerate.allow_empty_layers, degenerate.allow_constant_output)
        self.degeneracy.dense(self.model)
        guard = cfg.safeguard
        self.safeguard = Safeguard(
            self.model, self.params,
            calibration_batch(pool, guard.calibration_samples, cfg.seed + 1, setup.device),
            alphas=list(guard.alphas), enabled=guard.enabled,
            fallback=guard.fallback == "magnitude", labels=cfg.fisher.labels,
            chunk=cfg.data.batch_size, loss_fn=setup.loss_fn, screen=guard.screen_samples,
            stats=self.stats)
        c = setup.components
        # a baseline's own mask is its result: the safeguard never replaces it
        self.baseline = c.estimator.baseline or c.scorer.baseline
        self.dense_fit = DenseFit(c.estimator, cfg.fisher.reuse_dense)
        fisher = cfg.fisher
        self.sampler = GradientSampler(
            self.model, self.params, self.masks.keep, pool, setup.loss_fn,
            num_grads=fisher.num_grads, grad_batch=fisher.grad_batch, labels=fisher.labels,
            seed=cfg.seed, device=setup.device, dtype=fisher.storage_dtype,
            offload=fisher.offload, method=fisher.grad_method)

    @property
    def cfg(self) -> DictConfig:
        return self.setup.cfg

    # -- what the Runner drives (wfcore.run.runner.PrunedRun) -------------------------------
    def evaluate(self) -> dict[str, float | None]:
        s = self.setup
        return evaluate(self.model, s.data.test, batch_size=s.cfg.data.batch_size,
                        loss_fn=s.loss_fn, device=s.device, num_workers=s.cfg.data.num_workers)

    def restore_dense(self) -> None:
        """The dense model, no masks, and the gradient sampler back at its seed."""
        structured_run.restore_dense(self)
        self.model.load_state_dict(self.setup.dense_state)
        self.masks.reset()
        self.sampler.reset()
        self.dense_fit.restored()

    def trainer(self, train_cfg: DictConfig, *, epochs: int, seed: int, decay_start: int,
                lr_key: str) -> Trainer:
        """A Trainer that fine-tunes the model with its masks held fixed."""
        s = self.setup
        return Trainer(self.model, s.finetune_data, train_cfg, epochs=epochs,
                       batch_size=s.cfg.data.batch_size, loss_fn=s.loss_fn, device=s.device,
                       seed=seed, masks=self.masks, num_workers=s.cfg.data.num_workers,
                       decay_start=decay_start, desc="fine-tune", lr_key=lr_key)

    def sparsity(self) -> float:
        return self.masks.sparsity()

    def layer_sparsity(self) -> dict[str, dict[str, float]]:
        return self.masks.layer_sparsity()

    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """No momentum may revive a pruned weight."""
        self.masks.zero_optimizer_state(optimizer)

    def step_start(self, step: PruneStep) -> None:
        s = self.setup
        s.plugins.hook.wfcore_step_start(step=step, run_dir=str(s.run_dir),
                                         options=s.components.hooks)

    def step_end(self, step: PruneStep, record: dict[str, Any]) -> None:
        s = self.setup
        s.plugins.hook.wfcore_step_end(step=step, record=record, run_dir=str(s.run_dir),
                                       options=s.components.hooks)

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def stateful(self) -> dict[str, Stateful]:
        """The run's components that hold random state (``interfaces.Stateful``)."""
        c = self.setup.components
        made = {"estimator": c.estimator, "scorer": c.scorer, "allocator": c.allocator,
                "scheduler": c.scheduler}
        return {s: comp for s, comp in made.items() if isinstance(comp, Stateful)}

    def state_dict(self) -> dict[str, Any]:
        """The model, masks, sampler and components' states, for the checkpoint."""
        return {"model": self.model_state(), "masks": self.masks.state_dict(),
                "sampler": self.sampler.state_dict(),
                "components": {section: c.state_dict()
                               for section, c in self.stateful().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        structured_run.restore(self, state["model"])  # a shrunk architecture first
        self.model.load_state_dict(state["model"])
        self.masks.load_state_dict(state["masks"])
        self.sampler.load_state_dict(state["sampler"])
        saved = state.get("components", {})
        for section, component in self.stateful().items():
            if section in saved:
                component.load_state_dict(saved[section])

    # -- what the run reads once --------------------------------------------------------
    def pruning_data(self) -> dict[str, Any]:
        """report.json ``pruning_data``: the pool pruning sees and its BatchNorm statistics."""
        return {**self.setup.pool_record, "batchnorm": self.stats.record()}

    def architecture(self) -> nn.Module:
        """A copy of the dense architecture on the CPU (weights to be loaded), for export."""
        return copy.deepcopy(self.pristine or self.model).cpu().eval()

    def close(self) -> None:
        """The dense fit kept for later steps released (an on-disk store removed)."""
        self.dense_fit.close()

    # -- the step ------------------------------------------------------------------------
    def prune_to(self, target: float) -> StepResult:
        """gradients -> estimate -> score -> allocate -> update (safeguarded): the model ends
        at ``target`` sparsity. The gradient store lives for this step only (it is closed,
        and an on-disk one removed, also on an error or Ctrl-C).

        Returns the step's record (the safeguard's choice: damp, alpha, loss increases;
        BatchNorm, gradient method) and the seconds of each stage (``STAGES``).
        """
        timings = dict.fromkeys(STAGES, 0.0)
        if self.cfg.structure.unit in STRUCTURED_UNITS:
            return StepResult(structured_run.prune_to(self, target, timings), timings)
        s, c = self.setup, self.setup.components
        needs, block = c.need_gradients(), self.cfg.structure.block
        stats_before = self.stats.mark()
        pattern = parse_pattern(self.cfg.structure.pattern)  # N:M: the masks' own rule
        with ExitStack() as stack:
            gradients, curvature = self.dense_fit.take() or (None, None)
            if needs and curvature is None:
                start = time.perf_counter()
                owner = self.dense_fit.stack if self.dense_fit.keeps() else stack
                assert s.plan.store is not None  # planned whenever a step needs gradients
                gradients = owner.enter_context(s.plan.store.open())  # as the plan decided
                self.sampler.sample_into(gradients)
                timings["gradients"] += time.perf_counter() - start
            problem = PruningProblem(self.model, self.params, self.masks, self.sampler,
                                     s.loss_fn, s.device,
                                     gradients if c.estimator.needs_gradients else None)
            if curvature is None:
                start = time.perf_counter()
                curvature = c.estimator.fit(problem)
                timings["estimate"] += time.perf_counter() - start
                self.dense_fit.put(gradients, curvature)
            start = time.perf_counter()
            gradient = None
            if c.scorer.needs_gradient:  # (then need_gradients(): they were sampled)
                assert gradients is not None
                gradient = self.sampler.layout.unflatten(gradients.mean().to(s.device))
            weights = problem.weights()
            scores = c.scorer.block_scores(weights, curvature, gradient, self.masks.keep, block)
            for n, sc in scores.items():
                if sc.shape != weights[n].shape or \
                        not torch.isfinite(sc[self.masks.keep[n]]).all():
                    raise WfcoreError(f"scorer '{self.cfg.scorer.name}' gave non-finite or "
                                      f"misshapen scores for '{n}'")
            new_keep = (nm_keep(scores, self.masks.keep, pattern) if pattern is not None
                        else c.allocator.allocate(scores, dict(self.masks.keep), target))
            new_keep = distributed.broadcast_masks(new_keep)  # rank 0's threshold everywhere
            prune_mask = {n: self.masks.keep[n] & ~new_keep[n] for n in new_keep}
            del scores
            update: Tensors | None
            choice: dict[str, Any] = {}  # a layer-wise estimator's record of what it chose
            if isinstance(c.estimator, LayerwiseEstimator):  # each layer's own mask and update
                update, new_keep = c.estimator.prune_layers(problem, new_keep, pattern)
                choice = c.estimator.step_record()
            else:
                update = c.scorer.update(weights, curvature, prune_mask, gradient)
            update, new_keep, record = self.safeguard.choose(
                weights, update, new_keep, curvature, gradient,
                magnitude_keep=None if self.baseline else lambda: nm_keep(
                    magnitude_scores(weights), self.masks.keep, pattern) if pattern is not None
                else c.allocator.allocate(
                    block_scores(magnitude_scores(weights), self.masks.keep, block),
                    dict(self.masks.keep), target))
            if update is not None:
                with torch.no_grad():
                    for n, p in self.params.items():
                        p.add_(update[n].to(device=p.device, dtype=p.dtype))
            self.masks.set(new_keep)
            distributed.broadcast_module(self.model)  # every rank ends with rank 0's weights
            self.stats.refresh()  # fresh running statistics for the pruned weights
            self.dense_fit.step_done()
            timings["prune"] += time.perf_counter() - start
        if choice:
            record["allocation_choice"] = choice
        record["batchnorm"] = self.stats.record(since=stats_before)
        if block > 1:
            record["whole_blocks"] = whole_blocks(self.masks.keep, block)
        if self.sampler.choice is not None:  # how per-sample gradients were taken, and why
            record["gradient_method"] = self.sampler.choice.record()
        self.degeneracy.check(self.model, self.masks, target)  # warns, or refuses
        return StepResult({"target_sparsity": target, **record}, timings)
