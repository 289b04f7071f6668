"""The learning-rate schedule (meteor/train/schedule.py): linear warm-up, then cosine to zero."""

import math
from itertools import pairwise

import pytest
import torch

from meteor.train.schedule import warmup_cosine


def _closed_form(step, total, warmup, decay_during_warmup=False):
    """The schedule written out independently: HF's get_cosine_schedule_with_warmup shape, with the
    ramp counted so that step warmup − 1 (the last warm-up step) is already at the peak."""
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if decay_during_warmup:
        progress = step / total
    else:
        progress = 0.0 if step < warmup else (step - warmup) / max(1, total - warmup)
    return ramp * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@pytest.mark.parametrize("total, warmup", [(1, 0), (1, 1), (10, 0), (10, 3), (100, 3), (5, 1)])
@pytest.mark.parametrize("decay_during_warmup", [False, True])
def test_every_step_equals_the_closed_form(total, warmup, decay_during_warmup):
    factor = warmup_cosine(total, warmup, decay_during_warmup)
    for step in range(total + 3):
        assert factor(step) == pytest.approx(_closed_form(step, total, warmup, decay_during_warmup),
                                             rel=1e-12, abs=1e-15), step


def test_ramp_is_linear_and_reaches_exactly_one_at_the_last_warm_up_step():
    factor = warmup_cosine(total_steps=100, warmup_steps=4)
    assert [factor(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0                                  # the cosine starts at its peak


def test_cosine_is_half_way_at_the_middle_and_zero_at_total():
    factor = warmup_cosine(total_steps=14, warmup_steps=4)
    assert factor(9) == pytest.approx(0.5)                   # 5 of the 10 decay steps done
    assert factor(14) == 0.0
    assert factor(20) == 0.0                                 # past the end it stays at zero
    decay = [factor(step) for step in range(4, 15)]
    assert all(a > b for a, b in pairwise(decay))            # strictly falling after the peak


def test_without_warm_up_the_first_step_is_at_the_peak():
    factor = warmup_cosine(total_steps=10, warmup_steps=0)
    assert factor(0) == 1.0
    assert factor(5) == pytest.approx(0.5)
    assert factor(10) == 0.0


def test_decay_during_warmup_runs_the_cosine_over_every_step():
    """The demo's variant: the cosine's clock starts at step 0, so the warm-up ends below 1."""
    factor = warmup_cosine(total_steps=10, warmup_steps=2, decay_during_warmup=True)
    assert factor(0) == pytest.approx(0.5 * 0.5 * (1 + math.cos(0.0)))
    assert factor(1) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    assert factor(1) < 1.0
    assert factor(5) == pytest.approx(0.5)
    assert factor(10) == 0.0
    assert warmup_cosine(10, 2, decay_during_warmup=False)(5) > factor(5)   # the default decays later


def test_lambda_lr_steps_through_the_schedule():
    """How the training loop uses it: LambdaLR calls the factor with the optimizer step count."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=2e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(8, 2))
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2e-5 * _closed_form(step, 8, 2) for step in range(8)])
    assert rates[1] == 2e-5 and optimizer.param_groups[0]["lr"] == 0.0


@pytest.mark.parametrize("total, warmup", [(0, 0), (-1, 0), (10, -1)])
def test_impossible_lengths_are_refused_naming_both_numbers(total, warmup):
    with pytest.raises(ValueError, match=rf"total_steps ≥ 1 and warmup_steps ≥ 0, got {total} and {warmup}"):
        warmup_cosine(total, warmup)
