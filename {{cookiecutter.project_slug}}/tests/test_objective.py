"""The objective's expected gradient against -grad(E[R] - beta KL), exactly, by enumeration.

With k = 2 samples per prompt, the expected gradient of the loss is a finite sum over every
ordered pair of strings (y1, y2), weighted by p_old(y1) p_old(y2): no sampling, no tolerance
beyond float64 rounding. Rows the docs call unbiased must match to 1e-9; rows they call biased
must miss by a measured margin.
"""

import pytest
import torch
from tabular_lm import TabularLM, exact_kl

from {{ cookiecutter.package_name }}.kl.objective import Objective, group_advantage, leave_one_out_mean, rloo_kl_loss
from {{ cookiecutter.package_name }}.kl.token_stats import masked_token_stats

VOCAB, MAX_LEN, BETA, K = 4, 3, 0.5, 2


def reward_of(tokens, mask):
    # Any function of the string: here, how often symbol 2 appears, plus the length.
    return ((tokens == 2) & mask).sum(-1).double() + 0.3 * mask.sum(-1).double()


def models(seed=11):
    p = TabularLM.random(VOCAB, MAX_LEN, seed=seed)
    q = TabularLM.random(VOCAB, MAX_LEN, seed=12)
    p.table.requires_grad_(True)
    return p, q


def target_gradient(p, q):
    """-grad(E_p[R] - beta KL(p || q)) from the exact sums over every string."""
    tokens, mask = p.strings()
    expected_reward = (p.log_prob(tokens, mask).exp() * reward_of(tokens, mask)).sum()
    (grad,) = torch.autograd.grad(-(expected_reward - BETA * exact_kl(p, q)), p.table)
    return grad


def pairs(p):
    """Every ordered pair of strings as adjacent groups of K = 2: tokens, mask [2 S^2, T]."""
    strings, string_mask = p.strings()
    first, second = torch.cartesian_prod(torch.arange(len(strings)), torch.arange(len(strings))).T
    rows = torch.stack([first, second], 1).flatten()
    return strings[rows], string_mask[rows]


def expected_loss_gradient(p, q, objective, old=None, use_ratio=True):
    """E over (y1, y2) ~ p_old x p_old of the gradient of the loss at p's weights, exactly.

    old: the sampling policy (default p: on-policy). use_ratio=False passes no old log-probs,
    as if the samples had been drawn at the current weights.
    """
    tokens, mask = pairs(p)
    with torch.no_grad():
        log_old = (old or p).log_prob(tokens, mask)
    pair_weight = log_old.reshape(-1, K).sum(1).exp()  # p_old(y1) p_old(y2)
    stats = masked_token_stats(p.logits(tokens), q.logits(tokens), tokens, mask, kl_grad=True)
    old_logp = log_old if old is not None and use_ratio else None
    parts = rloo_kl_loss(stats, mask, reward_of(tokens, mask), K, objective, old_logp=old_logp)
    (grad,) = torch.autograd.grad((pair_weight * parts.per_sample.reshape(-1, K).mean(1)).sum(), p.table)
    return grad


def relative_error(grad, target):
    return ((grad - target).norm() / target.norm()).item()


UNBIASED = [
    Objective(BETA, kl_gradient="mc"),
    Objective(BETA, kl_gradient="rb"),
    *(Objective(BETA, kl_placement="reward", reward_kl_estimator=e) for e in ("mc", "k3", "cv", "rb")),
    Objective(BETA, kl_placement="reward", reward_kl_estimator="mc", detach_reward_kl=True),
]
BIASED = [
    *(Objective(BETA, kl_placement="reward", reward_kl_estimator=e, detach_reward_kl=True) for e in ("k3", "cv", "rb")),
    Objective(BETA, advantage="grpo"),
]


def name(o):
    if o.kl_placement == "loss":
        return f"loss-{o.kl_gradient}-{o.advantage}"
    return f"reward-{o.reward_kl_estimator}{'-detached' if o.detach_reward_kl else ''}"


@pytest.mark.parametrize("objective", UNBIASED, ids=name)
def test_unbiased_rows_of_the_table_give_exactly_the_regularised_gradient(objective):
    p, q = models()
    assert relative_error(expected_loss_gradient(p, q, objective), target_gradient(p, q)) < 1e-9


@pytest.mark.parametrize("objective", BIASED, ids=name)
def test_biased_rows_of_the_table_miss_it_by_a_measured_margin(objective):
    p, q = models()
    error = relative_error(expected_loss_gradient(p, q, objective), target_gradient(p, q))
    assert error > 1e-2, f"{name(objective)}: relative bias {error:.2e}"


@pytest.mark.parametrize(
    "objective",
    [
        Objective(BETA, kl_gradient="mc"),
        Objective(BETA, kl_gradient="rb"),
        Objective(BETA, kl_placement="reward", reward_kl_estimator="mc"),
        Objective(BETA, kl_placement="reward", reward_kl_estimator="rb"),
    ],
    ids=name,
)
def test_importance_weighted_updates_off_the_sampling_policy_are_unbiased_at_the_current_weights(objective):
    # Samples from p_old, every term recomputed at theta, the whole estimate times p_theta/p_old.
    p, q = models(seed=11)
    shift = torch.randn(p.table.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    old = TabularLM(p.table.detach() + 0.4 * shift, MAX_LEN)
    target = target_gradient(p, q)
    assert relative_error(expected_loss_gradient(p, q, objective, old=old), target) < 1e-9
    # Without the ratio (the weights moved, the samples treated as fresh) the same update is biased.
    assert relative_error(expected_loss_gradient(p, q, objective, old=old, use_ratio=False), target) > 1e-2


def test_the_default_gradient_is_the_on_policy_rloo_estimate_written_out():
    # One update per batch, no clipping: -(A . log p) + beta * KL surrogate, as before PPO options existed.
    p, q = models()
    gen = torch.Generator().manual_seed(0)
    tokens, mask = p.sample(40 * K, gen)
    for kl_gradient in ("mc", "rb"):
        stats = masked_token_stats(p.logits(tokens), q.logits(tokens), tokens, mask, kl_grad=True)
        rewards = reward_of(tokens, mask)
        loss = rloo_kl_loss(stats, mask, rewards, K, Objective(BETA, kl_gradient=kl_gradient)).loss
        (got,) = torch.autograd.grad(loss, p.table)
        stats = masked_token_stats(p.logits(tokens), q.logits(tokens), tokens, mask, kl_grad=True)
        advantage = rewards - leave_one_out_mean(rewards, K)
        d = (stats.logp - stats.logq).detach()
        if kl_gradient == "mc":
            weight = (d.sum(-1) - leave_one_out_mean(d.sum(-1), K)).unsqueeze(-1)
            kl = (stats.logp * weight).sum(-1)
        else:
            kl_to_go = stats.kl.detach().flip(-1).cumsum(-1).flip(-1) - stats.kl.detach()
            kl = stats.kl.sum(-1) + (stats.logp * (kl_to_go - leave_one_out_mean(kl_to_go, K))).sum(-1)
        written = (-(advantage * stats.logp.sum(-1)) + BETA * kl).mean()
        (expected,) = torch.autograd.grad(written, p.table)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_clipping_stops_the_advantage_gradient_of_samples_whose_ratio_left_the_range():
    p, q = models()
    tokens, mask = p.sample(4 * K, torch.Generator().manual_seed(1))
    stats = masked_token_stats(p.logits(tokens), q.logits(tokens), tokens, mask, kl_grad=True)
    logp = stats.logp.sum(-1).detach()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    # 1.5 with A > 0 and 0.5 with A < 0: clipped; inside the range, or outside on the side the
    # advantage pushes away from (1.5 with A < 0, 0.5 with A > 0): not clipped.
    ratios = torch.tensor([1.5, 0.5, 1.05, 0.95, 1.0, 1.5, 1.0, 0.5], dtype=torch.float64)
    objective = Objective(0.0, kl_gradient="mc", clip_range=0.2)
    parts = rloo_kl_loss(stats, mask, rewards, K, objective, old_logp=logp - ratios.log())
    assert parts.advantage.tolist() == [1.0, -1.0, -1.0, 1.0, 2.0, -2.0, -3.0, 3.0]
    grads = [torch.autograd.grad(term, p.table, retain_graph=True)[0].norm().item() for term in parts.per_sample]
    clipped = [g == 0 for g in grads]
    assert clipped == [True, True, False, False, False, False, False, False]
    assert parts.clip_fraction.item() == 2 / 8


def test_grpo_advantage_is_the_group_standardised_reward():
    values = torch.tensor([1.0, 3.0, 5.0, 5.0, 0.0, 4.0])
    grpo = group_advantage(values, 3, "grpo")
    groups = values.reshape(2, 3)
    expected = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(grpo, expected.flatten())
    assert group_advantage(torch.ones(4), 2, "grpo").abs().max() == 0
    torch.testing.assert_close(group_advantage(values, 3, "rloo"), values - leave_one_out_mean(values, 3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kl_placement": "logits"}, "kl_placement must be one of loss, reward"),
        ({"reward_kl_estimator": "k2"}, "valid names are mc, k3, cv, rb"),
        ({"advantage": "ppo"}, "advantage must be one of rloo, grpo"),
        ({"clip_range": 0.0}, "clip_range must be > 0"),
        ({"kl_gradient": "k3"}, "valid names are mc, rb"),
    ],
)
def test_bad_objective_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Objective(BETA, **kwargs)


def test_leave_one_out_mean_uses_only_the_other_samples():
    values = torch.tensor([1.0, 3.0, 10.0, 20.0, 40.0, 60.0])
    torch.testing.assert_close(leave_one_out_mean(values, 3), torch.tensor([6.5, 5.5, 2.0, 50.0, 40.0, 30.0]))
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_mean(values, 1)
    with pytest.raises(ValueError, match="groups of 4"):
        leave_one_out_mean(values, 4)
