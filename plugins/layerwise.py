"""Layer-wise pruning: the estimators ``exact_obs``, ``sparsegpt`` and ``wanda``.

The orchestration lives here; the algebra of each method, tensors in and tensors out, in
its own module (``exact_obs``, ``sparsegpt``, ``wanda``; ``layer_hessian`` for what they
share). A pruning step:

1. ``fit``: the curvature whose scores, through the configured scorer and allocator, set
   how many weights each layer loses. ``allocation: guide`` fits the ``guide`` estimator
   (magnitude by default; ``{name: woodfisher}`` gives WoodFisher's global threshold).
   ``allocation: reconstruction`` measures each layer's relative reconstruction error
   e_l(s) = err / tr(W H W^T)/2 at the sparsities of ``levels`` with the method itself (OBC's
   database) and scores every weight by the slope of the lower convex hull of its layer's
   curve at its rank, so that one global threshold (``allocator: global``) minimises the
   sum of the layers' relative errors for the target (the Lagrangian of OBC's search).
2. ``prune_layers``: the calibration inputs (``samples`` of the pruning pool) run through
   the model once per layer, in forward order, with the layers before already pruned; a
   hook on the layer adds its input columns to H and stops the forward pass; the method
   prunes the layer to its count and writes its weights; the next layer follows.
   ``allocation: choose`` does this twice, for the curves' counts and for one global
   threshold over the guide's OBS scores, and keeps the pruned model whose loss on the
   same calibration batches is the lower (``step_record`` says which).

Layers: ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (any ``groups``, through unfold) and
``nn.MultiheadAttention.in_proj_weight`` (the query, key and value rows see the query,
key and value inputs). A prunable parameter of another kind, or one whose module is never
called by its ``forward`` (an attention's ``out_proj``), keeps the allocator's mask
without an update (said in the log).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from wfcore.plugins import exact_obs, sparsegpt, wanda
from wfcore.plugins.allocators import GlobalAllocator, global_with_caps
from wfcore.plugins.layer_allocation import ReconstructionCurvature, ReconstructionScorer
from wfcore.plugins.layer_hessian import (
    SUPPORTED,
    HessianSum,
    LayerResult,
    PairedSum,
    columns_of,
    obs_with_mask,
    parts_of,
    prepare,
    reconstruction_error,
)
from wfcore.plugins.layer_search import (
    LevelDatabase,
    PathDatabase,
    fine_slopes,
    keep_with_count,
    rank_slopes,
    search,
)
from wfcore.plugins.magnitude import IdentityCurvature
from wfcore.plugins.scorers import Obs

from wfcore import (
    Curvature,
    EstimatorCost,
    HessianEstimator,
    LayerwiseEstimator,
    PruningProblem,
    Scorer,
    Tensors,
    hookimpl,
)
from wfcore.progress import disabled

log = logging.getLogger(__name__)

ALLOCATIONS = ("guide", "reconstruction", "choose")
LEVELS = [0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99]


@dataclass
class LayerwiseOptions:
    samples: int = 1000  # calibration samples of the pruning pool behind each layer's H
    batch_size: int = 128  # samples per forward pass
    damp: float = 0.01  # added to diag(H), as a fraction of its mean (SparseGPT: 1%)
    # guide: the guide estimator's curvature sets each layer's count through the scorer
    # and allocator; reconstruction: each layer's reconstruction error curve does (see
    # the module doc; use with allocator.name=global); choose: both (the curves' counts
    # through the allocator, and one global threshold over the guide's OBS scores at the
    # same total) pruned layer after layer, the lower calibration loss kept
    allocation: str = "guide"
    # {name, **options} of the estimator whose curvature the scorer and allocator read
    # with allocation: guide or choose (magnitude = the weights' magnitudes)
    guide: dict[str, Any] = field(default_factory=lambda: {"name": "magnitude"})
    # sparsities at which allocation: reconstruction measures each layer's error
    levels: list[float] = field(default_factory=lambda: list(LEVELS))
    memory_gb: float = 1.0  # working memory of one layer's algebra (ExactOBS: rows at once)
    # allocation: reconstruction or choose: candidate per-layer counts scored by the
    # calibration loss of the model stitched from each layer's pruned weights (OBC's
    # SPDY-style search; see plugins/layer_search.py); 0 = the curves' counts as the
    # allocator gives them
    search: int = 0
    # each layer fitted to the dense model's output from the pruned model's inputs
    # (||W X - W^ X^||^2 instead of ||W X^ - W^ X^||^2): the error of the layers before
    # is corrected rather than carried on (two forward passes per layer)
    correct: bool = False

    def validate(self) -> None:
        if self.search < 0:
            raise ValueError(f"search {self.search} must be >= 0 (candidates scored)")
        if self.search and self.allocation not in ("reconstruction", "choose"):
            raise ValueError("search needs allocation: reconstruction or choose")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation '{self.allocation}' is not one of "
                             f"{', '.join(ALLOCATIONS)}")
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError("samples and batch_size must be >= 1")
        if self.damp < 0:
            raise ValueError(f"damp {self.damp} must be >= 0")
        if not self.guide or "name" not in self.guide:
            raise ValueError("guide needs a 'name' (a registered estimator)")
        if any(not 0.0 < s < 1.0 for s in self.levels):
            raise ValueError(f"levels {self.levels} must lie in (0, 1)")


@dataclass
class ExactOBSOptions(LayerwiseOptions):
    # of the greedy path (OBC's is float32); the chosen set's weights are solved in float64
    dtype: str = "float32"

    def validate(self) -> None:
        super().validate()
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype '{self.dtype}' is not float32 or float64")


@dataclass
class SparseGPTOptions(LayerwiseOptions):
    # columns per block of lazy updates and mask selection (the reference's 128);
    # null = the whole layer as one block
    block_size: int | None = 128


@dataclass
class Part:
    """One weight matrix that a layer-wise method prunes with one H."""

    param: str
    rows: slice  # its rows of the parameter
    index: int  # which part of the module (conv group; query/key/value)


def module_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def supported(module: nn.Module, attr: str) -> bool:
    return (isinstance(module, SUPPORTED) and attr == "weight") or \
        (isinstance(module, nn.MultiheadAttention) and attr == "in_proj_weight")


def parts(name: str, module: nn.Module, shape: torch.Size) -> list[Part]:
    count = parts_of(module)
    size = shape[0] // count
    return [Part(name, slice(k * size, (k + 1) * size), k) for k in range(count)]


class StopForward(Exception):
    """Raised by a hook once the layer it waits for has seen its input."""


class Calibration:
    """The calibration inputs, run through the model with hooks that collect H."""

    def __init__(self, problem: PruningProblem, samples: int, batch_size: int):
        self.model = problem.model
        self.batches = list(problem.batches(samples, batch_size))
        self.inputs = [x for x, _ in self.batches]
        self.device = problem.device

    def run(self, modules: dict[str, nn.Module], sums: dict[str, list[Any]],
            stop_after: str | None, inputs: list[torch.Tensor] | None = None) -> list[str]:
        """Every batch forward (eval mode, gradients on so that fused attention paths that
        skip submodules stay off), adding each module's input columns to its sums; stop a
        pass once ``stop_after`` has its input. Returns the modules in the order called."""
        called: list[str] = []

        def hook(name: str, module: nn.Module) -> Callable:
            def add(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                if name not in called:
                    called.append(name)
                if not sums[name]:
                    pass
                elif isinstance(mod, nn.MultiheadAttention):
                    qkv: list[torch.Tensor] = [kwargs[k] if k in kwargs else args[i]
                                               for i, k in enumerate(("query", "key", "value"))]
                    for k, x in enumerate(qkv):
                        x = x.transpose(0, 1) if not mod.batch_first else x
                        sums[name][k].add(x.reshape(-1, x.shape[-1]))
                else:
                    for k, acc in enumerate(sums[name]):
                        acc.add(columns_of(mod, args[0], k))
                if name == stop_after:
                    raise StopForward
            return add

        handles = [m.register_forward_pre_hook(hook(n, m), with_kwargs=True)
                   for n, m in modules.items()]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                for x in self.inputs if inputs is None else inputs:
                    try:
                        self.model(x)
                    except StopForward:
                        pass
        finally:
            self.model.train(was_training)
            for h in handles:
                h.remove()
        return called


def hessian_sums(module: nn.Module, weight: torch.Tensor, device: torch.device
                 ) -> list[HessianSum]:
    cols = weight.shape[1] * math.prod(weight.shape[2:])
    return [HessianSum(cols, device) for _ in range(parts_of(module))]


class Columns:
    """The input columns of one batch (a stand-in for a ``HessianSum``)."""

    def __init__(self) -> None:
        self.X: torch.Tensor | None = None

    def add(self, X: torch.Tensor) -> None:
        self.X = X.detach() if self.X is None else torch.cat([self.X, X.detach()])


def paired_run(calibration: Calibration, problem: PruningProblem, dense: Tensors, mod: str,
               module: nn.Module, param: torch.Tensor) -> list[HessianSum]:
    """One ``PairedSum`` per part of ``mod``: each batch through the dense model (the
    weights ``dense``) and through the model as it is now, the module's inputs paired."""
    now = {n: p.detach().clone() for n, p in problem.params.items()}
    cols = param.shape[1] * math.prod(param.shape[2:])
    sums = [PairedSum(cols, problem.device) for _ in range(parts_of(module))]
    try:
        for x in calibration.inputs:
            seen = []
            for weights in (dense, now):
                with torch.no_grad():
                    for n, p in problem.params.items():
                        p.copy_(weights[n])
                cols_ = {mod: [Columns() for _ in sums]}
                calibration.run({mod: module}, cols_, stop_after=mod, inputs=[x])
                seen.append(cols_[mod])
            for k, acc in enumerate(sums):
                X, Xh = seen[0][k].X, seen[1][k].X
                assert X is not None and Xh is not None
                acc.add_pair(X, Xh)
    finally:
        with torch.no_grad():
            for n, p in problem.params.items():
                p.copy_(now[n])
    return list(sums)


def channels_last(shape: torch.Size) -> torch.Tensor:
    """Column order (kernel..., in channel) of a conv weight's flattened columns, so that
    m consecutive columns are m consecutive input channels at one kernel position."""
    return torch.arange(math.prod(shape[1:])).reshape(shape[1:]).movedim(0, -1).reshape(-1)


@torch.no_grad()
def loss_with(problem: PruningProblem, weights: Tensors,
              batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The mean loss over ``batches`` (eval mode) of the model holding ``weights``; its
    own weights are restored after."""
    before = problem.weights()
    model = problem.model
    was_training = model.training
    try:
        for n, p in problem.params.items():
            p.copy_(weights[n].to(device=p.device, dtype=p.dtype))
        model.eval()
        total, seen = 0.0, 0
        for x, y in batches:
            total += float(problem.loss_fn(model(x), y)) * len(x)
            seen += len(x)
        return total / max(seen, 1)
    finally:
        model.train(was_training)
        for n, p in problem.params.items():
            p.copy_(before[n])


class Layerwise(LayerwiseEstimator):
    """The orchestration shared by the three methods; ``prune_matrix`` is the method."""

    Options = LayerwiseOptions

    def __init__(self, options: LayerwiseOptions | None = None):
        self.options = options or self.Options()
        self._guide: HessianEstimator | None = None
        # allocation: reconstruction with search: each part's database, the curves and the
        # calibration batches they were measured on (set by fit)
        self._database: dict[str, list[tuple[Part, LevelDatabase]]] = {}
        self._curves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._energy: dict[str, float] = {}
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        # allocation: choose: the guide's curvature (set by fit) and the last step's choice
        self._guide_curvature: Curvature | None = None
        self._choice: dict[str, Any] = {}

    # -- the method ---------------------------------------------------------------------
    def prune_matrix(self, W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, zeros: int,
                     pattern: tuple[int, int] | None) -> LayerResult:
        raise NotImplementedError

    def profile(self, W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor,
                levels: list[int]) -> list[float]:
        raise NotImplementedError

    def database(self, W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor) -> LevelDatabase:
        """The method's results on one part at any count (``layer_search``)."""
        return LevelDatabase(W, H, keep, self.database_weights, self.profile)

    def database_weights(self, W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor,
                         zeros: int) -> torch.Tensor:
        return self.prune_matrix(W, H, keep, zeros, None).weights

    def algebra_cost(self, rows: int, cols: int) -> tuple[int, float]:
        """(bytes, flops) of one (rows, cols) matrix."""
        return 8 * (cols * cols * 3 + rows * cols * 3), float(cols ** 3 + rows * cols ** 2)

    # -- the contract -------------------------------------------------------------------
    def guide(self) -> dict[str, Any] | None:
        return dict(self.options.guide) if self.options.allocation in ("guide", "choose") \
            else None

    def set_guide(self, estimator: HessianEstimator) -> None:
        self._guide = estimator

    # the guide's gradients (WoodFisher's m rows); a read-only property where the contract
    # declares a class attribute, which nothing assigns to
    @property
    def needs_gradients(self) -> bool:  # type: ignore[override]
        return self._guide is not None and self._guide.needs_gradients

    def paired_scorer(self) -> Scorer | None:
        return ReconstructionScorer() if self.options.allocation in ("reconstruction", "choose") \
            else None

    def cost(self, layout, m: int, device: torch.device | str) -> EstimatorCost:
        peak, flops = 0, 0.0
        for n in layout.names:
            shape = layout.shapes[n]
            rows, cols = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
            nbytes, f = self.algebra_cost(rows, cols)
            peak, flops = max(peak, nbytes + 4 * cols * cols * 8), flops + f
            flops += 2.0 * self.options.samples * cols * cols  # H (Linear; conv: x positions)
        guide = self._guide.cost(layout, m, device) if self._guide is not None else None
        if guide is not None:
            peak, flops = max(peak, guide.working_bytes), flops + guide.flops
        return EstimatorCost(working_bytes=peak, flops=flops,
                             note=f"{len(layout.names)} layer(s) in sequence, "
                                  f"{self.options.samples} calibration samples")

    def fit(self, problem: PruningProblem) -> Curvature:
        if self.options.allocation == "choose":
            self._guide_curvature = (
                self._guide.fit(problem) if self._guide is not None
                else IdentityCurvature({n: p.detach() for n, p in problem.params.items()}))
            return self.reconstruction_curvature(problem)
        if self.options.allocation == "reconstruction":
            return self.reconstruction_curvature(problem)
        if self._guide is None:
            return IdentityCurvature({n: p.detach() for n, p in problem.params.items()})
        return self._guide.fit(problem)

    # -- allocation: reconstruction -----------------------------------------------------
    def reconstruction_curvature(self, problem: PruningProblem) -> ReconstructionCurvature:
        """Each layer's relative error at ``levels``, measured on the current model's
        inputs (one forward pass for all layers, OBC's database)."""
        layers = self.layers(problem)
        sums = {mod: hessian_sums(module, problem.params[parts_[0].param], problem.device)
                for mod, (module, parts_) in layers.items()}
        calibration = Calibration(problem, self.options.samples, self.options.batch_size)
        calibration.run({mod: module for mod, (module, _) in layers.items()}, sums, None)
        curves: dict[str, list[list[tuple[int, float]]]] = {}  # param -> its parts' curves
        self._database, self._curves = {}, {}
        self._batches = calibration.batches if self.options.search else []
        for mod, (module, parts_) in tqdm(layers.items(), desc="layer error curves",
                                          leave=False, disable=disabled(False)):
            for part in parts_:
                curves.setdefault(part.param, []).append(
                    self.part_curve(problem, part, module, sums[mod][part.index]))
        out = {}
        for name, pieces in curves.items():
            numel = problem.params[name].numel()
            zeros = [z for z, _ in pieces[0]]
            errors = [sum(p[i][1] for p in pieces) for i in range(len(zeros))]
            energy = errors[-1] if errors[-1] > 0 else 1.0
            out[name] = (torch.tensor([z * len(pieces) for z in zeros], dtype=torch.float64)
                         .clamp(max=numel), torch.tensor(errors, dtype=torch.float64) / energy)
        if self.options.search:
            self._curves = out
            self._energy = {n: float(sum(p[-1][1] for p in pieces))
                            for n, pieces in curves.items()}
        return ReconstructionCurvature({n: p.detach() for n, p in problem.params.items()}, out)

    def part_curve(self, problem: PruningProblem, part: Part, module: nn.Module,
                   acc: HessianSum) -> list[tuple[int, float]]:
        """(zeros, error) of one part from its current zeros to all of its weights."""
        W = problem.params[part.param].detach()[part.rows].flatten(1).double()
        keep = problem.masks.keep[part.param][part.rows].flatten(1)
        numel, now = W.numel(), int((~keep).sum())
        levels = sorted({z for s in self.options.levels if (z := round(s * numel)) > now})
        database = self.database(W, acc.H, keep)
        errors = database.errors(levels) if levels else []
        if self.options.search:
            self._database.setdefault(part.param, []).append((part, database))
        energy = 0.5 * float(((W @ acc.H) * W).sum())
        return [(now, 0.0), *zip(levels, errors, strict=True), (numel, energy)]

    # -- pruning ------------------------------------------------------------------------
    def layers(self, problem: PruningProblem) -> dict[str, tuple[nn.Module, list[Part]]]:
        """{module name: (module, its parts)} of the supported prunable parameters."""
        out: dict[str, tuple[nn.Module, list[Part]]] = {}
        for name, p in problem.params.items():
            module, attr = module_of(problem.model, name)
            if not supported(module, attr):
                log.warning("%s: %s.%s has no layer-wise reconstruction here; it keeps the "
                            "allocator's mask without an update", name,
                            type(module).__name__, attr)
                continue
            out[name.rpartition(".")[0]] = (module, parts(name, module, p.shape))
        return out

    def step_record(self) -> dict[str, Any]:
        return dict(self._choice)

    @torch.no_grad()
    def prune_layers(self, problem: PruningProblem, keep: Tensors,
                     pattern: tuple[int, int] | None = None) -> tuple[Tensors, Tensors]:
        o = self.options
        self._choice = {}
        if o.search and self._curves and pattern is None:
            keep = self.searched_keep(problem, keep)
        if o.allocation != "choose" or pattern is not None or self._guide_curvature is None:
            return self.sequential(problem, keep, pattern)
        candidates = {"reconstruction": keep, "guide": self.guide_keep(problem, keep)}
        calibration = Calibration(problem, o.samples, o.batch_size)
        results, losses = {}, {}
        for name, masks in candidates.items():
            results[name] = self.sequential(problem, masks, pattern, calibration)
            losses[name] = self.pruned_loss(problem, *results[name], calibration.batches)
        best = min(losses, key=lambda n: losses[n])
        counts = {name: {n: int((~k).sum()) for n, k in results[name][1].items()}
                  for name in results}
        self._choice = {"allocation": best, "calibration_loss": losses,
                        "zeros": counts[best]}
        log.info("allocation: choose: %s (calibration loss %s)", best,
                 ", ".join(f"{n} {v:.4g}" for n, v in losses.items()))
        return results[best]

    def guide_keep(self, problem: PruningProblem, keep: Tensors) -> Tensors:
        """One global threshold over the guide's OBS scores (the floors of the global
        allocator's defaults), at the total count of zeros of ``keep``."""
        assert self._guide_curvature is not None
        scores = Obs().scores(problem.weights(), self._guide_curvature, None)
        masks = {n: problem.masks.keep[n] for n in keep}
        zeros = sum(int((~k).sum()) for k in keep.values())
        return global_with_caps({n: scores[n] for n in keep}, masks, zeros,
                                GlobalAllocator().caps(masks))

    @torch.no_grad()
    def pruned_loss(self, problem: PruningProblem, update: Tensors, keep: Tensors,
                    batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """The loss on the calibration samples (those behind each layer's H) of the model
        with ``update`` applied and ``keep`` zeroed; the weights are left as they came."""
        before = problem.weights()
        return loss_with(problem, {n: (before[n].double() + update[n].to(w.device))
                                   * keep[n].to(w.device) for n, w in before.items()}, batches)

    @torch.no_grad()
    def sequential(self, problem: PruningProblem, keep: Tensors,
                   pattern: tuple[int, int] | None, calibration: Calibration | None = None
                   ) -> tuple[Tensors, Tensors]:
        """Every layer pruned to its count of ``keep``, in forward order (on the batches of
        ``calibration``, else a fresh draw of ``samples``)."""
        o = self.options
        before = problem.weights()
        current = {n: k.clone() for n, k in problem.masks.keep.items()}
        new_keep = {n: k.clone() for n, k in keep.items()}
        layers = self.layers(problem)
        if calibration is None:
            calibration = Calibration(problem, o.samples, o.batch_size)
        modules = {mod: module for mod, (module, _) in layers.items()}
        order = calibration.run(modules, {m: [] for m in modules}, None)
        for mod in [m for m in modules if m not in order]:
            log.warning("%s: never called by the model's forward; it keeps the allocator's "
                        "mask without an update", mod)
        try:
            for mod in tqdm(order, desc=f"{type(self).__name__} layers", leave=False,
                            disable=disabled(False)):
                module, parts_ = layers[mod]
                param = problem.params[parts_[0].param]
                sums = {mod: hessian_sums(module, param, problem.device)}
                if o.correct and not isinstance(module, nn.MultiheadAttention):
                    sums = {mod: paired_run(calibration, problem, before, mod, module, param)}
                else:
                    calibration.run({mod: module}, sums, stop_after=mod)
                for part in parts_:
                    self.prune_part(param, part, sums[mod][part.index], current, keep,
                                    new_keep, pattern)
            update = {n: problem.params[n].detach().double() * new_keep[n] - before[n].double()
                      for n in before}
        finally:
            for n, p in problem.params.items():
                p.copy_(before[n])
        return update, new_keep

    def searched_keep(self, problem: PruningProblem, keep: Tensors) -> Tensors:
        """The allocator's masks, with the per-layer counts of the calibration loss search
        (``layer_search``) over the layers of the database."""
        names = [n for n in self._database if n in self._curves]
        numel = {n: problem.params[n].numel() for n in names}
        now = {n: int((~problem.masks.keep[n]).sum()) for n in names}
        if any(sum(int((~db.keep).sum()) for _, db in self._database[n]) != now[n]
               for n in names):
            log.warning("search: the masks changed since the curves were measured; "
                        "the allocator's counts are kept")
            return keep
        base = {n: int((~keep[n]).sum()) for n in names}
        top = max(self.options.levels)
        caps = {n: min(numel[n], max(base[n], round(top * numel[n]))) for n in names}
        slopes = {n: self.layer_slopes(n, numel[n], now[n]) for n in names}
        best, tried = search(slopes, now, caps, base,
                             lambda counts: self.stitched_loss(problem, keep, counts),
                             self.options.search)
        log.info("search: %d candidates; counts %s (loss %.4g) against the allocator's %s "
                 "(loss %.4g)", len(tried), best, min(v for _, v in tried), base, tried[0][1])
        out = dict(keep)
        for n in names:
            out[n] = keep_with_count(problem.params[n], problem.masks.keep[n], best[n])
        return out

    def layer_slopes(self, name: str, numel: int, now: int) -> torch.Tensor:
        """The slope of a layer's relative error at each further zero: at every count
        where the method's database gives its steps (ExactOBS's paths), else from the
        hull of the curve at ``levels``."""
        losses = [db.step_losses() for _, db in self._database[name]]
        if all(x is not None for x in losses):
            return fine_slopes([x for x in losses if x is not None], self._energy[name],
                               numel, now)
        zeros, errors = self._curves[name]
        return rank_slopes(zeros.tolist(), errors.tolist(), numel, now)

    @torch.no_grad()
    def stitched_loss(self, problem: PruningProblem, keep: Tensors,
                      counts: dict[str, int]) -> float:
        """The calibration loss of the model whose layers hold their database weights at
        ``counts`` (other prunable parameters: the allocator's masks)."""
        before = problem.weights()
        weights = {}
        for n in problem.params:
            if n not in counts:
                weights[n] = before[n] * keep[n].to(before[n].device)
                continue
            mask = keep_with_count(before[n], problem.masks.keep[n], counts[n])
            w = before[n].clone()
            for part, db in self._database[n]:
                zeros = int((~mask[part.rows]).sum())
                w[part.rows] = db.weights(zeros).reshape(w[part.rows].shape).to(w)
            weights[n] = w
        return loss_with(problem, weights, self._batches)

    def prune_part(self, param: nn.Parameter, part: Part, acc: HessianSum, current: Tensors,
                   keep: Tensors, new_keep: Tensors, pattern: tuple[int, int] | None) -> None:
        """Prune one part in place: ``param`` and ``new_keep`` get its weights and mask.
        ``current``: the masks before the step; ``keep``: the allocator's (its count)."""
        name, rows = part.param, part.rows
        W = param.detach()[rows].flatten(1).double()
        if isinstance(acc, PairedSum):  # fitted to the dense model's output
            W = acc.target(W, self.options.damp)
        now = current[name][rows].flatten(1).to(W.device)
        given = keep[name][rows].flatten(1).to(W.device)
        shape = param[rows].shape
        own_pattern = pattern is not None and shape[1] % pattern[1] == 0
        # under N:M, a conv's columns go channels last: a group is m consecutive columns
        perm = channels_last(shape).to(W.device) if own_pattern and len(shape) > 2 else None
        H = acc.H
        if perm is not None:
            W, now, H = W[:, perm], now[:, perm], H[perm][:, perm]
        if pattern is not None and not own_pattern:  # N:M groups that are not whole
            result = self.given_mask(W, H, given & now)
        else:
            result = self.prune_matrix(W, H, now, int((~given).sum()),
                                       pattern if own_pattern else None)
        weights, mask = result.weights, result.keep
        if perm is not None:
            inverse = torch.argsort(perm)
            weights, mask = weights[:, inverse], mask[:, inverse]
        param[rows] = weights.reshape(shape).to(param.dtype)
        new_keep[name][rows] = mask.reshape(shape).to(new_keep[name].device)

    def given_mask(self, W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor) -> LayerResult:
        """The layer keeps ``keep`` as it is; subclasses add their update."""
        return LayerResult(torch.where(keep, W, 0.0), keep, 0.0)


class ExactOBS(Layerwise):
    Options = ExactOBSOptions
    options: ExactOBSOptions

    def prune_matrix(self, W, H, keep, zeros, pattern):
        return exact_obs.prune(W, H, keep, zeros, self.options.damp, pattern,
                               chunk=self.chunk(W.shape[1]), dtype=self.dtype())

    def profile(self, W, H, keep, levels):
        return exact_obs.error_profile(W, H, keep, self.options.damp, levels,
                                       chunk=self.chunk(W.shape[1]), dtype=self.dtype())

    def dtype(self) -> torch.dtype:
        return getattr(torch, self.options.dtype)

    def database(self, W, H, keep):
        return PathDatabase(W, H, keep, self.options.damp, self.chunk(W.shape[1]),
                            self.dtype(), self.database_weights)

    def given_mask(self, W, H, keep):
        W0 = W
        W, _, Hinv = prepare(W, H, self.options.damp)
        weights = obs_with_mask(W, Hinv, ~keep)
        return LayerResult(weights, keep, reconstruction_error(W0, weights, H))

    def chunk(self, cols: int) -> int:
        return max(1, int(self.options.memory_gb * 2**30 // (2 * 8 * cols * cols)))

    def algebra_cost(self, rows, cols):
        chunk = min(rows, self.chunk(cols))
        return 8 * cols * cols * (chunk + 3), float(rows * cols ** 3 + cols ** 3)


class SparseGPT(Layerwise):
    Options = SparseGPTOptions

    def prune_matrix(self, W, H, keep, zeros, pattern):
        block = self.options.block_size
        if pattern is not None and block is not None and block % pattern[1]:
            block = (block // pattern[1] + 1) * pattern[1]
        return sparsegpt.prune(W, H, keep, zeros, self.options.damp, block, pattern)

    def profile(self, W, H, keep, levels):
        return sparsegpt.error_profile(W, H, keep, self.options.damp, levels,
                                       self.options.block_size)

    given_mask = ExactOBS.given_mask


class Wanda(Layerwise):
    def prune_matrix(self, W, H, keep, zeros, pattern):
        return wanda.prune(W, H, keep, zeros, pattern)

    def profile(self, W, H, keep, levels):
        return wanda.error_profile(W, H, keep, levels)

    def algebra_cost(self, rows, cols):
        return 8 * (cols * cols + 3 * rows * cols), float(rows * cols * math.log2(cols + 1))


@hookimpl
def wfcore_estimators():
    return {"exact_obs": ExactOBS, "sparsegpt": SparseGPT, "wanda": Wanda}
