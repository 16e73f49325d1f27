"""Interleaved timing: candidates timed in rounds, ratios taken round by round.

A speed-up is a ratio of two timings, and it means something only when both were measured
under the same conditions. On a machine that other work shares, the load changes by the
minute: timing one candidate after another puts every change of load into the ratio (a
dense model timed alone at the end of a busy run looked 3x slower than it was). So every
candidate is timed in every round, one slot each (a few batches), in an order rotated from
round to round (no candidate always runs first, right after another's threads went idle),
and a speed-up is the median over the rounds of the ratio measured *within* each round: a
change of load between rounds slows both terms of that round's ratio alike.

What the rounds cannot hide is a change of load *within* a round, or one that favours one
engine (a burner that takes one of two cores slows a 2-thread engine more than a 1-thread
one). The spread of the baseline's own rounds tells whether the load changed during the
run: when it is beyond ``NOISE_BOUND``, every ratio against that baseline is marked noisy.

Everything here takes plain callables and a clock, so that the logic is tested with a fake
timer (tests/test_rounds.py); ``export/bench.py`` feeds it real engines, and
``grad_calibration.py`` the ways of taking per-sample gradients.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)  # what a candidate is called

NOISE_BOUND = 0.10  # relative spread (interquartile range / median) of the baseline's rounds
MIN_ROUNDS = 3  # a median needs a few values, whatever the time limit


class Dropped(Exception):
    """Raised by a candidate's timer when the candidate is gone (its process died): the
    rounds go on without it, and its values are dropped."""


def rotation(count: int, round_index: int) -> list[int]:
    """The order of ``count`` candidates in round ``round_index``: 0..count-1 rotated left by
    the round index, so that each candidate runs first (and after each other) in turn."""
    shift = round_index % count if count else 0
    return [(shift + i) % count for i in range(count)]


def interleave(timers: dict[K, Callable[[], float]], *, runs: int,
               min_seconds: float = 0.0, max_seconds: float = float("inf"),
               clock: Callable[[], float] = time.perf_counter,
               on_round: Callable[[int], object] | None = None) -> dict[K, list[float]]:
    """Time every candidate once per round, in rotated order; ``{key: [value per round]}``.

    A timer returns what one slot measured (e.g. seconds per batch). Rounds go on until at
    least ``runs`` rounds (never fewer than ``MIN_ROUNDS``) and ``min_seconds`` have passed,
    and stop once ``max_seconds`` have passed with ``MIN_ROUNDS`` rounds done, or at
    ``10 * runs`` rounds. A timer that raises ``Dropped`` removes its candidate (and its
    values: the others' rounds stay aligned with each other). ``on_round`` is called with the
    number of rounds done (a progress bar).
    """
    keys = list(timers)
    values: dict[K, list[float]] = {k: [] for k in keys}
    least = max(runs, MIN_ROUNDS)
    start = clock()
    done = 0
    while keys:
        elapsed = clock() - start
        if done >= least and elapsed >= min_seconds:
            break
        if done >= MIN_ROUNDS and (elapsed > max_seconds or done >= 10 * least):
            break
        for i in rotation(len(keys), done):
            key = keys[i]
            try:
                values[key].append(float(timers[key]()))
            except Dropped as exc:
                log.warning("dropped: %s", exc)
                values.pop(key)
        keys = [k for k in keys if k in values]
        done += 1
        if on_round is not None:
            on_round(done)
    return values


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); all three the value itself for one value."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def spread(values: Sequence[float]) -> float:
    """The relative spread of ``values``: interquartile range / median (0 for one value).

    Robust to one odd round, large when a change of load split the rounds in two."""
    q1, q2, q3 = quartiles(values)
    return (q3 - q1) / q2 if q2 else 0.0


@dataclass
class Ratio:
    """The per-round ratios of a baseline's value to a candidate's (a speed-up when the
    values are times): their median and interquartile range."""

    median: float
    low: float  # first quartile
    high: float  # third quartile
    rounds: int

    @classmethod
    def of(cls, baseline: Sequence[float], candidate: Sequence[float]) -> Ratio:
        if len(baseline) != len(candidate) or not baseline:
            raise ValueError(f"ratios need values of the same rounds ({len(baseline)} vs "
                             f"{len(candidate)})")
        ratios = [b / c for b, c in zip(baseline, candidate, strict=True)]
        low, median, high = quartiles(ratios)
        return cls(median, low, high, len(ratios))


def noisy(baseline: Sequence[float], bound: float = NOISE_BOUND) -> bool:
    """Whether the baseline's own rounds spread beyond ``bound``: the load changed during
    the run, and ratios against it are less sure than their spread says."""
    return spread(baseline) > bound
