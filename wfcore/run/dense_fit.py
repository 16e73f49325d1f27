"""The dense model's gradients and curvature, fitted once for every step that starts from it.

Every target of ``oneshot`` (and of ``iterative``, for its first sub-step) is pruned from
the dense model, with the gradient sampler back at its seed: the m gradients, the
curvature and the mean gradient of each such step are the same numbers. ``DenseFit`` keeps
the first such step's gradient store (open: a curvature such as WoodFisher's streams its
blocks from it) and curvature, and hands them to the next step that starts from the
dense model instead of sampling and fitting again.

Memory: the store and the curvature live from the first dense step to the end of the run
(``close``) instead of for one step, i.e. the plan's peak for the whole run; nothing else
is added. Resume: nothing is saved; a resumed run fits the dense model once more, and,
since the sampler restarts at its seed, gets the same numbers. An estimator with random
state of its own (``Stateful``) draws afresh at every step and is never reused.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

from wfcore.interfaces import Curvature, HessianEstimator, Stateful

log = logging.getLogger(__name__)


class DenseFit:
    """The dense fit of a run (``enabled``: config ``fisher.reuse_dense``)."""

    def __init__(self, estimator: HessianEstimator, enabled: bool = True):
        self.enabled = enabled and not isinstance(estimator, Stateful)
        self.stack = ExitStack()  # holds the kept gradient store open
        self.at_dense = False  # the model is the dense model, the sampler at its seed
        self.fit: tuple[Any, Curvature] | None = None  # (gradient store or None, curvature)
        self.reused = 0

    def restored(self) -> None:
        """The model was just put back to the dense weights (``Pruning.restore_dense``)."""
        self.at_dense = True

    def take(self) -> tuple[Any, Curvature] | None:
        """The kept (gradients, curvature) if this step starts from the dense model."""
        if self.at_dense and self.fit is not None:
            self.reused += 1
            log.info("the dense model's gradients and curvature, fitted at an earlier step, "
                     "serve this step (fisher.reuse_dense)")
            return self.fit
        return None

    def keeps(self) -> bool:
        """Whether this step's fit is to be kept (its store goes on ``stack``)."""
        return self.enabled and self.at_dense and self.fit is None

    def put(self, gradients: Any, curvature: Curvature) -> None:
        if self.keeps():
            self.fit = (gradients, curvature)

    def step_done(self) -> None:
        """The weights moved: the next step starts from the dense model only after
        ``restored``."""
        self.at_dense = False

    def close(self) -> None:
        """Free the kept store and curvature (end of the run)."""
        self.fit = None
        self.stack.close()
