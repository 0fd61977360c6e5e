"""Learning-rate multipliers: warmup, then constant or decay to zero at the last step."""

import math

import pytest

from {{ cookiecutter.package_name }}.training.optimizer import lr_lambda
from {{ cookiecutter.package_name }}.training.options import Optimization


def test_warmup_then_constant():
    f = lr_lambda(4, None, "constant")
    assert [f(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("decay, at_step_4", [("linear", 1 - 2 / 10), ("cosine", 0.5 * (1 + math.cos(math.pi * 0.2)))])
def test_decay_reaches_zero_at_the_last_step(decay, at_step_4):
    f = lr_lambda(2, 12, decay)
    assert f(1) == 1.0 and f(2) == 1.0
    assert f(4) == pytest.approx(at_step_4)  # the two shapes differ here (0.8 vs 0.905)
    assert f(7) == pytest.approx(0.5)  # and meet half-way
    assert f(12) == pytest.approx(0.0, abs=1e-12)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="needs a finite number of steps"):
        lr_lambda(0, None, "linear")
    with pytest.raises(ValueError, match="lr_decay must be"):
        Optimization(lr_decay="exp")
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        Optimization(warmup_steps=-1)
