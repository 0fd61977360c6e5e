"""The RLOO + KL surrogate loss: its mean gradient is -grad(E[R] - beta KL), checked by enumeration."""

import math

import pytest
import torch
from tabular_lm import TabularLM, exact_kl

from {{ cookiecutter.package_name }}.estimators import masked_token_stats
from {{ cookiecutter.package_name }}.objective import leave_one_out_mean, rloo_kl_loss

VOCAB, MAX_LEN, BETA, K = 5, 3, 0.5, 2


def reward_of(tokens, mask):
    # Any function of the string: here, how often symbol 2 appears, plus the length.
    return ((tokens == 2) & mask).sum(-1).double() + 0.3 * mask.sum(-1).double()


def test_leave_one_out_mean_uses_only_the_other_samples():
    values = torch.tensor([1.0, 3.0, 10.0, 20.0, 40.0, 60.0])
    torch.testing.assert_close(leave_one_out_mean(values, 3), torch.tensor([6.5, 5.5, 2.0, 50.0, 40.0, 30.0]))
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_mean(values, 1)
    with pytest.raises(ValueError, match="groups of 4"):
        leave_one_out_mean(values, 4)


@pytest.mark.parametrize("kl_gradient", ["mc", "rb"])
def test_loss_gradient_is_unbiased_for_the_regularised_objective(kl_gradient):
    p = TabularLM.random(VOCAB, MAX_LEN, seed=11)
    q = TabularLM.random(VOCAB, MAX_LEN, seed=12)
    p.table.requires_grad_(True)
    tokens, mask = p.strings()
    expected_reward = (p.log_prob(tokens, mask).exp() * reward_of(tokens, mask)).sum()
    (exact,) = torch.autograd.grad(-(expected_reward - BETA * exact_kl(p, q)), p.table)
    exact = exact.flatten()
    direction = exact / exact.norm()

    gen = torch.Generator().manual_seed(0)
    projections = []
    for _ in range(40):
        # Sample prompts' groups: 200 groups of K adjacent samples.
        tokens, mask = p.sample(200 * K, gen)
        stats = masked_token_stats(p.logits(tokens), q.logits(tokens), tokens, mask, kl_grad=kl_gradient == "rb")
        loss = rloo_kl_loss(stats, mask, reward_of(tokens, mask), K, BETA, kl_gradient).loss
        (grad,) = torch.autograd.grad(loss, p.table)
        projections.append(grad.flatten() @ direction)
    projections = torch.stack(projections)
    sem = projections.std() / math.sqrt(len(projections))
    assert abs(projections.mean() - exact @ direction) < 4 * sem
