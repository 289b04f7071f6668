"""Comparing models trained with several seeds on the same questions: means, spreads, and paired
differences with 95 % intervals.

A model trained with S seeds and scored on Q questions gives a 0/1 matrix ``correct`` (S, Q). Two
sources of noise separate two such models: which questions were asked (Q is finite) and which seed
trained each (S is small). ``paired_difference`` resamples both (a two-level bootstrap): the
questions jointly for the two models, since they answered the same ones (that pairing is what
makes small differences visible), and the seeds of each model on their own, since a seed of one
model has no natural partner among the other's. With one seed per model only the questions are
resampled, and the interval says nothing about training noise; the result says how many seeds it
rests on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class SeedSummary:
    """An accuracy over seeds: the mean, the sample standard deviation across seeds (None with one
    seed) and each seed's value."""

    mean: float
    sd: float | None
    per_seed: tuple[float, ...]

    def text(self, digits: int = 3) -> str:
        """``0.471 ± 0.012`` (± one standard deviation over seeds), or ``0.471`` for one seed."""
        return f"{self.mean:.{digits}f}" if self.sd is None else f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


def seed_summary(values: Sequence[float]) -> SeedSummary:
    if not values:
        raise ValueError("seed_summary needs at least one seed's value")
    mean = sum(values) / len(values)
    sd = None if len(values) < 2 else math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return SeedSummary(mean, sd, tuple(values))


@dataclass(frozen=True)
class Difference:
    """Accuracy of model A minus model B, with its two-sided interval at ``CONFIDENCE``."""

    difference: float
    low: float
    high: float
    seeds: tuple[int, int]
    """(seeds of A, seeds of B) the comparison rests on."""
    questions: int

    @property
    def verdict(self) -> str:
        """"A better" / "B better" when the interval excludes 0, else "not resolved"."""
        if self.low > 0:
            return "A better"
        if self.high < 0:
            return "B better"
        return "not resolved"

    def text(self, digits: int = 3) -> str:
        return f"{self.difference:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0) -> Difference:
    """Mean accuracy of A minus that of B, with a two-level bootstrap interval (see the module).

    ``correct_a``: (S_a, Q), ``correct_b``: (S_b, Q), 1 where a seed's model answered a question
    right; column q of both is the same question."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not a.size or not b.size:
        raise ValueError(f"paired_difference needs two (seeds, questions) arrays over the same questions, "
                         f"got shapes {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    questions = a.shape[1]
    q = rng.integers(0, questions, size=(samples, questions))            # the same questions for both
    a_seeds = rng.integers(0, a.shape[0], size=(samples, a.shape[0]))
    b_seeds = rng.integers(0, b.shape[0], size=(samples, b.shape[0]))
    per_question_a = a.mean(axis=0) if a.shape[0] == 1 else None
    per_question_b = b.mean(axis=0) if b.shape[0] == 1 else None
    draws = np.empty(samples)
    for i in range(samples):
        mean_a = per_question_a if per_question_a is not None else a[a_seeds[i]].mean(axis=0)
        mean_b = per_question_b if per_question_b is not None else b[b_seeds[i]].mean(axis=0)
        draws[i] = (mean_a - mean_b)[q[i]].mean()
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Difference(float(a.mean() - b.mean()), float(low), float(high), (a.shape[0], b.shape[0]), questions)
