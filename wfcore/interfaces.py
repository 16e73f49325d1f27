"""The contracts every plugin implements.

Tensors are passed as ``{param_name: tensor}`` dicts in the order of the prunable
parameters, so that a curvature may couple layers (one block over all of them).
Masks are boolean tensors, True where a weight is kept.
"""

from __future__ import annotations

import dataclasses
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

# prune_update's modes; how an estimator's ``damp`` is read (public here too)
from wfcore.choices import DAMP_MODES, UPDATE_MODES  # noqa: F401
from wfcore.errors import WfcoreDeprecationWarning, WfcoreError
from wfcore.masks import Masks, block_scores

if TYPE_CHECKING:
    from wfcore.fisher.gradients import ParamLayout

Tensors = dict[str, torch.Tensor]
# A data set's loss: (outputs, targets) -> the scalar mean over the batch.
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]



@dataclass
class DataBundle:
    """What a data set plugin gives: train and test sets and the input they produce."""

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    # (outputs, targets) -> the scalar mean loss over the batch, used by every stage that
    # takes a loss (training, gradients, calibration, evaluation, K-FAC). None = cross-
    # entropy of logits over num_classes against class indices.
    loss: Loss | None = None


def dataset_size(dataset: Dataset) -> int:
    """The number of samples of a data set.

    torch's ``Dataset`` declares no ``__len__`` (an iterable-style one has none); the data
    sets here are map-style, indexed from 0 to their length.
    """
    if not isinstance(dataset, Sized):
        raise TypeError(f"{type(dataset).__name__} has no length: a data set must be map-style")
    return len(dataset)


def declare_options(factory: Callable[..., Any], options: type | None) -> None:
    """Give a factory function its ``Options`` dataclass (the keys of its config section;
    None: it takes no options): ``declare_options(mlp, MLPOptions)`` below ``def mlp``."""
    # a function takes any attribute, but its type (a Callable) declares none
    factory.Options = options  # type: ignore[attr-defined]


@runtime_checkable
class GradientRows(Protocol):
    """The m gradient rows of one pruning step, read a range of columns at a time.

    Column j is flat weight j of the problem's ``ParamLayout`` (parameters in order, each
    flattened row-major). ``wfcore.fisher.store.GradientStore`` is the implementation.
    """

    m: int  # rows
    d: int  # columns

    def columns(self, start: int, stop: int, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
        """(m, stop - start): columns ``start:stop`` of every row, a new tensor."""

    def mean(self) -> torch.Tensor:
        """(d,) float32: the mean gradient."""

    def square_mean(self) -> torch.Tensor:
        """(d,) float64: the mean of the squared gradients, diag(G^T G) / m."""


@runtime_checkable
class GradientSource(Protocol):
    """Where an estimator's data comes from: the m gradients of a pruning step, and
    mini-batches of inputs and targets for estimators that need activations (K-FAC).

    Targets follow ``labels``: ``empirical``, the data's own; ``sampled``, drawn from the
    model's predictive distribution (the softmax of its outputs) at the current weights,
    with a generator seeded from the run's seed, so that a seed gives the same draws.
    ``wfcore.fisher.gradients.GradientSampler`` is the implementation.
    """

    layout: ParamLayout  # the flat order of the prunable weights
    num_grads: int  # m, fisher.num_grads
    grad_batch: int  # samples behind each gradient, fisher.grad_batch
    labels: str  # empirical | sampled (fisher.labels)
    progress: bool  # whether loops that take seconds show a progress bar

    def sample(self, num_grads: int | None = None) -> torch.Tensor:
        """(m, d) gradients at the current weights, pruned coordinates zero; each row the
        gradient of the mean loss over ``grad_batch`` samples (m = ``num_grads`` by default).
        """

    def batches(self, samples: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, targets)`` mini-batches on the run's device, ``samples`` samples in all
        (the data reshuffled for each pass over it), ``batch_size`` or fewer at a time (the
        last one). With ``sampled`` labels the source runs the model once, without
        gradients, on each batch to draw its targets.
        """


@dataclass
class EstimatorCost:
    """What an estimator's fit needs beside the gradient store: for the plan of a run."""

    working_bytes: int  # peak memory of the fit and the update, store not included
    flops: float  # floating-point operations of the algebra (fit and one update)
    note: str = ""  # how the work is split, e.g. '12800 blocks in 40 chunk(s)'
    # whole reads of the gradient store by the fit and one update: on disk, each costs
    # store bytes / the disk's read rate (the plan counts them)
    store_passes: float = 0.0
    # of these, the update's (the pruning stage's; the rest are the fit's, the estimate stage)
    update_flops: float = 0.0
    update_store_passes: float = 0.0


@dataclass
class PruningProblem:
    """What an estimator sees: the model, its prunable parameters, the data (through
    ``source``: gradients and mini-batches) and the loss."""

    model: nn.Module
    params: dict[str, nn.Parameter]  # prunable parameters, in a fixed order
    masks: Masks
    source: GradientSource  # the step's data: gradients and (inputs, targets) batches
    loss_fn: Loss  # the data set's loss (cross-entropy unless it gives its own)
    device: torch.device
    # the step's m gradients of the masked weights, sampled by the pipeline's gradient
    # stage (None when the estimator declared needs_gradients = False)
    gradients: GradientRows | None = None

    def weights(self) -> Tensors:
        """Detached copies of the prunable weights."""
        return {name: p.detach().clone() for name, p in self.params.items()}

    def layout(self) -> ParamLayout:
        return self.source.layout

    def num_grads(self) -> int:
        return self.gradients.m if self.gradients is not None else self.source.num_grads

    def gradient_rows(self) -> GradientRows:
        """The step's m gradient rows, as the pipeline's gradient stage wrote them into the
        store its plan decided. A problem given none has none: nothing is sampled here."""
        if self.gradients is None:
            raise WfcoreError(
                "PruningProblem.gradient_rows(): the problem holds no gradient rows; an "
                "estimator that reads them declares needs_gradients = True (a run then samples "
                "them), and a caller outside a run samples them first: "
                "PruningProblem.with_gradients()")
        return self.gradients

    def with_gradients(self) -> PruningProblem:
        """This problem with its m gradient rows sampled now, in memory, through ``source``
        (``GradientSource.sample``): for a caller outside a run (tests, ``wfcore analyze``);
        a run's rows go into the store that its plan decided."""
        from wfcore.fisher.store import GradientStore

        return dataclasses.replace(self, gradients=GradientStore.from_tensor(self.source.sample()))

    def batches(self, samples: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, targets)`` mini-batches of the step's data (``GradientSource.batches``)."""
        return self.source.batches(samples, batch_size)

    @property
    def sampler(self) -> GradientSource:
        """Deprecated: the problem's ``source``."""
        warnings.warn("PruningProblem.sampler is deprecated and goes in the next release; "
                      "use PruningProblem.source (a GradientSource: sample(), batches()) "
                      "or PruningProblem.batches()", WfcoreDeprecationWarning, stacklevel=2)
        return self.source

    def gradient_source(self) -> GradientRows:
        """Deprecated: ``gradient_rows()``."""
        warnings.warn("PruningProblem.gradient_source() is deprecated and goes in the next "
                      "release; use PruningProblem.gradient_rows()", WfcoreDeprecationWarning,
                      stacklevel=2)
        return self.gradient_rows()


class Curvature(ABC):
    """An estimate of the inverse Hessian over the prunable parameters."""

    @abstractmethod
    def inverse_diagonal(self) -> Tensors:
        """diag(F^-1), one tensor of each parameter's shape."""

    @abstractmethod
    def inverse_mul(self, v: Tensors) -> Tensors:
        """F^-1 v."""

    def prune_update(self, prune_mask: Tensors, w: Tensors, mode: str) -> Tensors:
        """The OBS weight change that removes the weights where ``prune_mask`` is True.

        ``independent``: the sum of single-weight OBS updates,
        dw = -F^-1 sum_q e_q w_q / [F^-1]_qq. ``joint``: the exact OBS solution for the
        whole pruned set, -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 w_Q; curvatures that can solve it
        override this method.
        """
        if mode == "independent":
            diag = self.inverse_diagonal()
            u = {n: torch.where(prune_mask[n], w[n] / diag[n], torch.zeros_like(w[n])) for n in w}
            return {n: -dv for n, dv in self.inverse_mul(u).items()}
        if mode == "joint":
            raise NotImplementedError(
                f"{type(self).__name__} has no joint OBS update; use scorer.update=independent"
            )
        raise ValueError(f"unknown update mode {mode!r}; expected one of {UPDATE_MODES}")

    def inverse_blocks(self, block: int) -> Tensors | None:
        """[F^-1]_GG of every ``structure.block`` group G: for group OBS scores.

        One tensor per parameter, of shape (*group index, block, block) with the groups of
        ``wfcore.masks.to_groups`` (dim 1 cut into ``block`` consecutive channels; a
        parameter of fewer than 2 dimensions: (*shape, 1, 1)). The padding members of a
        row's smaller last group have the rows and columns of the identity. Optional: the
        default, None, says the curvature cannot give them (scores then fall back to the
        mean of the single-weight scores). A diagonal curvature needs none: for it the
        group score is that mean, exactly.
        """
        return None

    def quadratic(self, dw: Tensors) -> float | None:
        """dw^T F dw / 2, the quadratic model's loss increase of the change ``dw``.

        Optional: the safeguard records it as the predicted loss increase of each step.
        The default, None, says the curvature cannot tell (the record then has null).
        """
        return None

    def damping(self) -> float | None:
        """The damping that was added to F (the mean over blocks), for the report.

        Optional; the default, None, means the curvature has no damping to report.
        """
        return None


class Stateful:
    """A component that holds random state (a generator) defines both methods: the run's
    checkpoint saves ``state_dict()`` and a resumed run hands it to ``load_state_dict``,
    so that it draws the same numbers as an uninterrupted run. Tensors and plain values
    only (checkpoints load with ``weights_only=True``)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class HessianEstimator(ABC):
    """Builds a Curvature from a PruningProblem."""

    # whether fit reads problem.gradients: the pipeline samples the step's m gradients into
    # a store first (a visible, timed stage) only for estimators that do
    needs_gradients: bool = True
    # a reference method (magnitude, random): its own mask is its result, which the update
    # safeguard never replaces by another method's (magnitude's fallback mask)
    baseline: bool = False
    # whether its curvature gives ``Curvature.inverse_blocks``: the plan then counts the
    # group blocks of ``structure.block`` (b^2 numbers a group of b weights) in the peak
    group_blocks: bool = False

    @abstractmethod
    def fit(self, problem: PruningProblem) -> Curvature:
        """Estimate the curvature at the problem's current (masked) weights."""

    def paired_scorer(self) -> Scorer | None:
        """A scorer that this estimator's curvature is made for and that the run uses in
        place of the configured ``scorer`` (e.g. ``random``: the identity curvature with
        random scores). None, the default: the configured scorer."""
        return None

    def cost(self, layout: ParamLayout, m: int, device: torch.device | str) -> EstimatorCost:
        """Memory and flops of a fit over ``layout`` with m gradients, for the plan.

        Raise ``WfcoreError`` (one line: what does not fit, and what to change) for a fit
        that cannot run. The default counts a few per-weight float64 vectors.
        """
        return EstimatorCost(working_bytes=4 * layout.d * 8, flops=4.0 * m * layout.d)

    def stage_seconds(self, layout: ParamLayout, m: int,
                      device: torch.device | str) -> tuple[float, float] | None:
        """(fit, update) seconds of the algebra over ``layout`` with m gradients, timed on a
        small piece of it on ``device``, for the plan (the store's reads not included).
        None, the default: the plan takes ``cost().flops`` at the device's measured float64
        matrix-multiply rate."""
        return None


class LayerwiseEstimator(HessianEstimator):
    """An estimator that prunes layer by layer against each layer's reconstruction error
    (ExactOBS, SparseGPT, Wanda): the layer's input Hessian H = 2 X X^T from calibration
    batches, taken layer after layer from the already-pruned model.

    The pipeline asks it for a curvature as usual (``fit``): the scorer and the allocator
    read it to decide how many weights each layer loses. It then hands the allocator's
    keep-masks to ``prune_layers``, which takes each layer's count of zeros from them (and,
    where the method chooses its own mask, only the count), and returns the weight change
    and the masks it chose; the safeguard judges that change like any update.
    """

    needs_gradients: bool = False

    def guide(self) -> dict[str, Any] | None:
        """``{name, **options}`` of a registered estimator whose curvature ``fit`` returns
        (so that its scores, through the configured scorer and allocator, set each layer's
        count), or None. The pipeline builds it and hands it to ``set_guide``."""
        return None

    def set_guide(self, estimator: HessianEstimator) -> None:
        """Receive the estimator that ``guide`` names, built with its validated options."""

    def step_record(self) -> dict[str, Any]:
        """What the last ``prune_layers`` chose, for the step's record (empty: nothing)."""
        return {}

    @abstractmethod
    def prune_layers(self, problem: PruningProblem, keep: Tensors,
                     pattern: tuple[int, int] | None = None) -> tuple[Tensors, Tensors]:
        """(weight change, keep-masks): every prunable layer pruned to the count of zeros
        of ``keep`` (``pattern`` (n, m): n kept of every m consecutive input weights), in
        forward order, each layer seeing the inputs of the already-pruned layers before it.
        The model's weights are left as they came; pruned weights end exactly at zero."""


class Scorer(ABC):
    """Per-weight saliency, and the weight update that goes with removing weights."""

    needs_gradient: bool = False  # first-order scorers get the mean gradient
    baseline: bool = False  # a reference method (random): see HessianEstimator.baseline

    @abstractmethod
    def scores(self, weights: Tensors, curvature: Curvature, gradient: Tensors | None) -> Tensors:
        """One finite saliency per weight: the loss increase of removing it (lower goes first)."""

    def block_scores(self, weights: Tensors, curvature: Curvature, gradient: Tensors | None,
                     keep: Tensors, block: int) -> Tensors:
        """Scores under ``structure.block``: every weight of a group gets its group's score.

        ``keep``: the current masks (a group's pruned members are left out). The default is
        the mean of ``scores`` over each group's kept weights (``wfcore.masks.block_scores``);
        with ``block`` 1 it is ``scores`` itself.
        """
        return block_scores(self.scores(weights, curvature, gradient), keep, block)

    def update(
        self,
        weights: Tensors,
        curvature: Curvature,
        prune_mask: Tensors,
        gradient: Tensors | None,
    ) -> Tensors | None:
        """The change to apply to the weights when ``prune_mask`` is removed; None: mask only."""
        return None


class Allocator(ABC):
    """Turns scores into masks for a target sparsity over all prunable weights."""

    @abstractmethod
    def allocate(self, scores: Tensors, masks: Tensors, target: float) -> Tensors:
        """New keep-masks. Already pruned weights (False in ``masks``) stay pruned."""

    def admit(self, sizes: dict[str, int], targets: list[float]) -> None:
        """Refuse, before anything is trained or removed, a target this allocator cannot
        reach whatever the scores: ``sizes`` are the prunable parameters' weights (name:
        count, dense), ``targets`` every target and sub-target of the schedule. Raise a
        WfcoreError naming the config key. Default: every target is admitted."""
        return None


@dataclass
class PruneStep:
    """One pruning step of a schedule, evaluated and recorded on its own."""

    index: int
    target_sparsity: float
    substeps: list[float] = field(default_factory=list)  # sparsity after each sub-step
    from_dense: bool = False  # restart from the dense model (one-shot sweeps)
    finetune_epochs: int = 0  # fine-tuning after the step, masks held fixed
    # Gradual schedules: the fine-tuning epoch (counted over the whole run) at which the
    # step prunes; epochs before it are fine-tuned at the previous sparsity. None = at once.
    epoch: int | None = None

    def __post_init__(self) -> None:
        if not self.substeps:
            self.substeps = [self.target_sparsity]


class Scheduler(ABC):
    """Plans the pruning steps of a run."""

    @abstractmethod
    def plan(self) -> list[PruneStep]:
        """The steps, in order. Deterministic: a resumed run re-plans and skips done steps."""

    def train_overrides(self) -> dict[str, Any]:
        """Keys of the ``train`` section to override while fine-tuning (lr, lr_schedule,
        ...), plus ``lr_decay_start`` (epochs at the full LR before the schedule decays).
        """
        return {}


class Exporter(ABC):
    """Turns a pruned model into an artefact and checks it.

    The pipeline's export stage reads two declared fields, which an exporter sets from its
    options: ``step`` (the step whose model to export; None = the last) and ``dense``
    (also export the dense model beside it).
    """

    step: int | None = None
    dense: bool = False

    @abstractmethod
    def export(self, model: nn.Module, example: torch.Tensor, path: str,
               data: DataBundle | None = None, params: Tensors | None = None,
               metadata: dict[str, str] | None = None) -> dict[str, Any]:
        """Write the artefact to ``path``; return what was checked (for the report).

        ``data``: the run's data set, for exporters that calibrate on training samples
        (INT8) or measure accuracy on the test set; others ignore it. ``params``: the
        weights whose zeros the artefact must keep (None: the exporter's choice).
        ``metadata``: strings to store in the artefact (``wfcore export`` names the run
        and the state_dict it came from, as paths relative to the artefact).
        """

    def outputs(self, path: str) -> list[str]:
        """Every file ``export(..., path)`` writes: ``path`` first, then any beside it."""
        return [path]

    def check(self, model: nn.Module, example: torch.Tensor) -> str | None:
        """Whether ``model`` (its architecture; weights do not matter) can be exported,
        before anything is trained or sampled: a line for the plan, or a one-line
        WfcoreError saying what to change. Optional: the default, None, checks nothing."""
        return None

    def check_data(self, data: DataBundle) -> None:
        """Refuse, at the start of the run (before anything is pruned), a data set that
        ``export`` would fail on (too few training samples to calibrate, ...): raise a
        ConfigError naming the export key. Default: nothing to check."""
        return None
