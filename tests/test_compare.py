"""Comparing models over seeds and questions (meteor.eval.compare)."""

import math

import numpy as np
import pytest

from meteor.eval.compare import paired_difference, seed_summary


def test_seed_summary_is_the_mean_and_the_sample_standard_deviation():
    summary = seed_summary([0.40, 0.45, 0.50])
    assert summary.mean == pytest.approx(0.45) and summary.sd == pytest.approx(0.05)
    assert summary.text() == "0.450 ± 0.050"
    assert seed_summary([0.4]).sd is None and seed_summary([0.4]).text() == "0.400"
    with pytest.raises(ValueError, match="at least one seed"):
        seed_summary([])


def test_a_model_right_everywhere_beats_one_wrong_everywhere_with_no_doubt():
    found = paired_difference(np.ones((3, 50)), np.zeros((2, 50)))
    assert (found.difference, found.low, found.high) == (1.0, 1.0, 1.0)
    assert found.verdict == "A better" and found.seeds == (3, 2) and found.questions == 50


def test_one_seed_each_gives_the_paired_interval_over_questions():
    rng = np.random.default_rng(1)
    a = (rng.random((1, 4000)) < 0.55).astype(float)
    b = np.where(rng.random((1, 4000)) < 0.9, a, 1 - a)          # B agrees with A on 90 % of questions
    found = paired_difference(a, b, samples=4000)
    d = a[0] - b[0]
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)              # the paired normal interval
    assert found.difference == pytest.approx(d.mean())
    assert found.high - found.low == pytest.approx(2 * half, rel=0.1)
    # unpaired, the interval would be about sqrt(2 · 0.25 / 0.1) ≈ 2.2 times wider
    assert found.high - found.low < 0.6 * 2 * 1.96 * math.sqrt(0.25 * 2 / d.size)


def test_seeds_that_disagree_widen_the_interval():
    rng = np.random.default_rng(2)
    shared = (rng.random(2000) < 0.5).astype(float)
    steady = np.stack([shared] * 3)
    unsteady = np.stack([np.ones(2000), np.zeros(2000), shared])   # seeds at accuracy 1, 0 and 0.5
    narrow = paired_difference(steady, steady)
    wide = paired_difference(unsteady, steady)
    assert narrow.high - narrow.low == 0.0                        # identical models, identical seeds
    assert wide.high - wide.low > 0.3 and wide.verdict == "not resolved"


def test_mismatched_questions_are_refused():
    with pytest.raises(ValueError, match="same questions"):
        paired_difference(np.ones((2, 10)), np.ones((2, 11)))
