"""The exact-enumeration objective tests of test_objective.py, through the fused LM head: a tabular
LM is a linear head on one-hot hidden states (h = onehot(prefix), W = table^T), so the fused op
sees the same distributions and its gradient w.r.t. W is the table's."""

import pytest
import torch
from tabular_lm import TabularLM
from test_objective import BETA, MAX_LEN, VOCAB, K, pairs, reward_of, target_gradient

from {{ cookiecutter.package_name }}.kl.fused_head import fused_token_stats
from {{ cookiecutter.package_name }}.kl.objective import Objective, rloo_kl_loss
from {{ cookiecutter.package_name }}.kl.token_stats import masked_stats


def one_hot_hidden(model: TabularLM, tokens: torch.Tensor) -> torch.Tensor:
    """[B, T, n_prefixes]: the hidden state whose head output is the table row of the prefix."""
    return torch.nn.functional.one_hot(model.prefix_ids(tokens), model.table.shape[0]).double()


def fused_expected_gradient(p: TabularLM, q: TabularLM, objective: Objective) -> torch.Tensor:
    tokens, mask = pairs(p)
    with torch.no_grad():
        pair_weight = p.log_prob(tokens, mask).reshape(-1, K).sum(1).exp()
    stats = masked_stats(
        lambda safe: fused_token_stats(
            one_hot_hidden(p, tokens), p.table.T, one_hot_hidden(q, tokens), q.table.T, safe, chunk_rows=5
        ),
        tokens,
        mask,
    )
    parts = rloo_kl_loss(stats, mask, reward_of(tokens, mask), K, objective)
    (grad,) = torch.autograd.grad((pair_weight * parts.per_sample.reshape(-1, K).mean(1)).sum(), p.table)
    return grad


@pytest.mark.parametrize(
    "objective",
    [
        Objective(BETA, kl_gradient="mc"),
        Objective(BETA, kl_gradient="rb"),
        Objective(BETA, kl_placement="reward", reward_kl_estimator="rb"),
    ],
    ids=["loss-mc", "loss-rb", "reward-rb"],
)
def test_the_fused_head_gives_exactly_the_regularised_gradient(objective):
    p, q = TabularLM.random(VOCAB, MAX_LEN, seed=11), TabularLM.random(VOCAB, MAX_LEN, seed=12)
    p.table.requires_grad_(True)
    target = target_gradient(p, q)
    error = ((fused_expected_gradient(p, q, objective) - target).norm() / target.norm()).item()
    assert error < 1e-9


def test_the_fused_path_misses_when_the_rb_pathwise_term_is_dropped():
    # The same enumeration rejects a biased variant: rb with the KL detached (no pathwise term).
    p, q = TabularLM.random(VOCAB, MAX_LEN, seed=11), TabularLM.random(VOCAB, MAX_LEN, seed=12)
    p.table.requires_grad_(True)
    target = target_gradient(p, q)
    biased = Objective(BETA, kl_placement="reward", reward_kl_estimator="rb", detach_reward_kl=True)
    error = ((fused_expected_gradient(p, q, biased) - target).norm() / target.norm()).item()
    assert error > 1e-2
