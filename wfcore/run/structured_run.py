"""``structure.unit: channel`` and ``head`` inside a run: the pruning step, and the shrunk
architecture carried by the model's own state_dict.

A step samples the m gradients (when the estimator or ``structure.scores`` needs them),
scores every coupled channel (``group_obs``: WoodFisher's group OBS over the whole
Fisher, a fitted curvature's diagonal, magnitude, Taylor or random), allocates to the
target share of FLOPs or parameters (``structure.target``), applies the OBS update,
removes the channels from the modules, re-estimates BatchNorm statistics, and points the
run's parameters, masks and gradient sampler at the new, smaller tensors.

How a run directory keeps a shrunk model: the model gets a buffer ``wfcore_structure``
(the JSON of the example input's shape and Torch-Pruning's pruning history since the
dense model, as bytes), so every state_dict the run writes (checkpoint.pt,
model_step<N>.pt) says how to rebuild its architecture. ``fit_architecture`` replays
that history on a freshly built model before the state loads: resume, export.step and
``wfcore export RUN`` go through it. A dense state_dict cannot load into a shrunk model
(the dense one is rebuilt from the pristine copy a run keeps, ``restore_dense``).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from typing import Any

import torch
from torch import nn

from wfcore.channels import CostModel, replay
from wfcore.choices import GROUP_SCORES
from wfcore.errors import ConfigError, WfcoreError
from wfcore.fisher.gradients import ParamLayout
from wfcore.group_obs import Diagonal, DualFisher, GroupScorer, Precomputed, Random, Taylor
from wfcore.heads import remove_heads
from wfcore.interfaces import PruningProblem
from wfcore.masks import Masks, select_params
from wfcore.structured import prune_channels, recalibrate_batchnorm, torch_pruning_scores

# the run's step machinery (wfcore.run.pruning.Pruning), which calls this module: not
# imported back
Pruning = Any

log = logging.getLogger(__name__)

STATE_KEY = "wfcore_structure"


def read_structure(state: dict[str, Any]) -> dict[str, Any] | None:
    t = state.get(STATE_KEY)
    return None if t is None else json.loads(bytes(t.to(torch.uint8).tolist()).decode())


def set_structure(model: nn.Module, structure: dict[str, Any]) -> None:
    data = torch.tensor(list(json.dumps(structure).encode()), dtype=torch.uint8)
    if STATE_KEY in dict(model.named_buffers(recurse=False)):
        delattr(model, STATE_KEY)
    model.register_buffer(STATE_KEY, data)


def fit_architecture(model: nn.Module, state: dict[str, Any], what: str) -> bool:
    """Shrink a freshly built ``model`` as the run that wrote ``state`` did (its
    ``wfcore_structure``); True when it did. A no-op for states without one."""
    saved = read_structure(state)
    current = read_structure(model.state_dict())
    if saved == current:
        return False
    if saved is None:
        raise WfcoreError(f"{what}: a state_dict of the full architecture cannot load into "
                          "a model whose channels were removed (structure.unit: channel)")
    if current is not None:
        raise WfcoreError(f"{what}: its channels differ from the model's (another step of "
                          "a structure.unit: channel run); load it into a freshly built model")
    example = torch.zeros(saved["input_shape"])
    replay_history(model, example, saved["history"])
    set_structure(model, saved)
    log.info("%s: architecture rebuilt from %d removals of channels", what,
             len(saved["history"]))
    return True


def replay_history(model: nn.Module, example: torch.Tensor, history: list[list[Any]]) -> None:
    """Apply a run's removals in order: runs of channel removals through Torch-Pruning's
    history (``channels.replay``), head removals (``[module, "heads", indices]``) through
    ``heads.remove_heads``."""
    channels: list[list[Any]] = []
    for entry in [*history, None]:
        if entry is not None and entry[1] != "heads":
            channels.append(entry)
            continue
        if channels:
            replay(model, example, channels)
            channels = []
        if entry is not None:
            remove_heads(model, entry[0], list(entry[2]))


def group_scorer(pruning: Pruning, G: torch.Tensor | None, curvature: Any) -> GroupScorer:
    cfg = pruning.cfg
    scores = cfg.structure.scores
    if scores == "random":
        return Random(cfg.seed)
    if scores == "taylor":
        assert G is not None  # taylor scores make the run sample gradients
        return Taylor(G.mean(0))
    if scores == "tp_magnitude":
        example = pruning.setup.data.test[0][0][None].to(pruning.setup.device)
        return Precomputed(torch_pruning_scores(pruning.model, example))
    if scores == "magnitude" or cfg.estimator.name == "magnitude":
        return Diagonal()
    if cfg.estimator.name == "woodfisher":
        est = pruning.setup.components.estimator.options
        assert G is not None  # WoodFisher needs gradients: the run sampled them
        square_mean = G.double().square().mean(0)
        live = square_mean > 0
        scale = float(square_mean[live].mean()) if bool(live.any()) else 1.0
        damp = est.damp * scale if est.damp_mode == "relative" else est.damp
        return DualFisher(G, damp)
    return CurvatureGroups(curvature, ParamLayout(pruning.params))


class CurvatureGroups(Diagonal):
    """Any fitted curvature: its diagonal group score, its own joint update."""

    reads = ("in",)

    def __init__(self, curvature: Any, layout: ParamLayout):
        self.curvature, self.layout = curvature, layout
        super().__init__(layout.flatten(curvature.inverse_diagonal()).double().cpu())

    def update(self, w: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
        dw = self.curvature.prune_update(self.layout.unflatten(removed),
                                         self.layout.unflatten(w), "joint")
        return self.layout.flatten({n: t.double().cpu() for n, t in dw.items()})


def prune_to(pruning: Pruning, target: float, timings: dict[str, float]) -> dict[str, Any]:
    """``Pruning.prune_to`` under ``structure.unit: channel``: ``target`` is the share of
    FLOPs (or parameters, ``structure.target``) removed from the dense model. Returns the
    step's record; ``timings`` (the step's own, by stage) is added to."""
    cfg, c, device = pruning.cfg, pruning.setup.components, pruning.setup.device
    if cfg.structure.scores not in GROUP_SCORES:
        raise ConfigError(f"config key 'structure.scores': '{cfg.structure.scores}' is not "
                          f"one of {', '.join(GROUP_SCORES)}")
    structure = read_structure(pruning.model.state_dict())
    example = pruning.setup.data.test[0][0][None].to(device)
    if structure is None:
        macs, params = CostModel(pruning.model, example).total()
        structure = {"input_shape": list(example.shape), "history": [],
                     "dense": {"macs": macs, "params": params}}
    # a later step's target is from the dense model: the share still to go of what is left
    metric = "macs" if cfg.structure.target == "flops" else "params"
    totals = dict(zip(("macs", "params"), CostModel(pruning.model, example).total(),
                      strict=True))
    left = 1 - (1 - target) * structure["dense"][metric] / totals[metric]
    if left <= 0:
        log.info("structured: %.1f%% %s already removed", 100 * target, cfg.structure.target)
        dense = structure["dense"]
        counted = {**totals, "flops_removed_from_dense": 1 - totals["macs"] / dense["macs"],
                   "params_removed_from_dense": 1 - totals["params"] / dense["params"]}
        return {"target_sparsity": target, "damp": None, "mask": "channels", "alpha": 0.0,
                "predicted_increase": None, "actual_increase": None,
                "structured": {"channels_removed": 0, "counted": counted}}
    start = time.perf_counter()
    G = None
    needs = c.estimator.needs_gradients or cfg.structure.scores == "taylor"
    if needs and cfg.structure.scores != "random":
        G = pruning.sampler.sample(cfg.fisher.num_grads).to(device)  # (m, d)
    timings["gradients"] += time.perf_counter() - start
    start = time.perf_counter()
    curvature = None
    if cfg.estimator.name not in ("woodfisher", "magnitude") and cfg.structure.scores == "auto":
        with torch.no_grad():
            problem = PruningProblem(pruning.model, pruning.params, pruning.masks,
                                     pruning.sampler, pruning.setup.loss_fn, device, None)
            if c.estimator.needs_gradients:  # its own m rows, in memory (G is not stored)
                problem = problem.with_gradients()
            curvature = c.estimator.fit(problem)
    scorer = group_scorer(pruning, G, curvature)
    timings["estimate"] += time.perf_counter() - start
    start = time.perf_counter()
    if pruning.pristine is None:
        pruning.pristine = copy.deepcopy(pruning.model)
    step = prune_channels(pruning.model, example, pruning.params, scorer, left,
                          metric=cfg.structure.target, min_keep=cfg.structure.min_keep,
                          rank=cfg.structure.rank, round_to=cfg.structure.round_to,
                          unit=cfg.structure.unit, normalize=cfg.structure.normalize,
                          update=cfg.scorer.get("update") != "none")
    samples = cfg.structure.recalibrate
    if samples:
        batches = [x for x, _ in pruning.sampler.batches(samples, cfg.data.batch_size)]
        recalibrate_batchnorm(pruning.model, batches)
    structure["history"] += step.history
    set_structure(pruning.model, structure)
    rebind(pruning)
    timings["prune"] += time.perf_counter() - start
    record = step.record()
    dense = structure["dense"]
    record["counted"]["flops_removed_from_dense"] = 1 - step.counted["macs"] / dense["macs"]
    record["counted"]["params_removed_from_dense"] = 1 - step.counted["params"] / dense["params"]
    # the safeguard table's columns: no step-length search here (alpha 1)
    damp = float(scorer.damp) if isinstance(scorer, DualFisher) else None
    return {"target_sparsity": target, "damp": damp,
            "mask": "channels", "alpha": 1.0, "predicted_increase": None,
            "actual_increase": None, "structured": record}


def rebind(pruning: Pruning) -> None:
    """Point the run's parameters, masks, gradient sampler and safeguard at the model's
    current (shrunk) tensors."""
    pruning.params = select_params(pruning.model, pruning.cfg.model.params)
    pruning.masks = Masks(pruning.params)
    sampler = pruning.sampler
    sampler.params, sampler.masks = pruning.params, pruning.masks.keep
    sampler.layout = ParamLayout(pruning.params)
    pruning.safeguard.params = pruning.params


def restore_dense(pruning: Pruning) -> None:
    """The dense architecture back in the same model object (its weights load next)."""
    if pruning.pristine is None:
        return
    pruning.model.__dict__.update(copy.deepcopy(pruning.pristine).__dict__)
    rebind(pruning)


def restore(pruning: Pruning, state: dict[str, Any]) -> None:
    """Before a checkpoint's model loads: rebuild its architecture (resume)."""
    if pruning.pristine is None and read_structure(state) is not None:
        pruning.pristine = copy.deepcopy(pruning.model)
    if fit_architecture(pruning.model, state, "--resume"):
        rebind(pruning)


def rebuilt_trainer(runner: Any, trainer: Any) -> Any:
    """A Trainer over the shrunk model's new parameters that continues ``trainer``'s LR
    schedule and data order (its momentum is not carried over: the tensors changed)."""
    trainer.close()
    new = runner.make_trainer(runner.segment)
    new.schedule.load_state_dict(trainer.schedule.state_dict())
    new.generator.set_state(trainer.generator.get_state())
    new.epochs_done = trainer.epochs_done
    for group in new.optimizer.param_groups:
        group["lr"] = trainer.optimizer.param_groups[0]["lr"]
    return new
