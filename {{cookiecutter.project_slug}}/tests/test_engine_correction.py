"""sampling.engine_correction: responses drawn from a proposal mu != p, weighted back to p
(docs/estimators.md §12), against exact answers from enumerating every string of tiny models.

mu is a perturbed copy of the policy, as an engine whose kernels differ from the trainer's; its
per-token log-probs of the drawn tokens play the engine's reported ones. Sampled checks use fixed
seeds and standard errors from the sample; exact checks weigh every string (or every pair of
strings, k = 2) by its probability under mu.
"""

import dataclasses
import math

import pytest
import torch
from tabular_lm import TabularLM, exact_kl

from {{ cookiecutter.package_name }}.kl.correction import ImportanceWeights, effective_sample_size, importance_weights
from {{ cookiecutter.package_name }}.kl.estimators import kl_surrogate, kl_values, sequence_kl
from {{ cookiecutter.package_name }}.kl.objective import Objective, rloo_kl_loss
from {{ cookiecutter.package_name }}.kl.token_stats import masked_token_stats
from {{ cookiecutter.package_name }}.training.module import RBKLModule
from {{ cookiecutter.package_name }}.training.options import Sampling

VOCAB, MAX_LEN, K, BETA = 5, 4, 4, 0.5


def tabular_models(shift: float = 0.5) -> tuple[TabularLM, TabularLM, TabularLM]:
    """Policy p (differentiable), reference q and the engine's proposal mu = p perturbed."""
    p = TabularLM.random(VOCAB, MAX_LEN, seed=1)
    q = TabularLM.random(VOCAB, MAX_LEN, seed=2)
    noise = torch.randn(p.table.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mu = TabularLM(p.table + shift * noise, MAX_LEN)
    p.table.requires_grad_(True)
    return p, q, mu


def token_logp(model: TabularLM, tokens, mask):
    """[B, T] log model(y_t | y_<t) of the drawn tokens, 0 on padding: what an engine reports."""
    logp = torch.log_softmax(model.logits(tokens), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).detach()


def stats_of(p, q, tokens, mask):
    return masked_token_stats(p.logits(tokens), q.logits(tokens), tokens, mask, kl_grad=True)


# -- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mc", "k3", "cv", "rb"])
def test_weighted_values_average_to_the_exact_kl_over_every_string_of_mu(name):
    p, q, mu = tabular_models()
    tokens, mask = p.strings()
    mu_prob = mu.log_prob(tokens, mask).exp()
    exact = exact_kl(p, q).item()
    args = (p.logits(tokens).detach(), q.logits(tokens), tokens, mask, name)
    weighted = sequence_kl(*args, engine_logp=token_logp(mu, tokens, mask))
    assert (mu_prob * weighted).sum().item() == pytest.approx(exact, rel=1e-10)
    # Taking mu's strings for p's misses by a margin.
    assert abs((mu_prob * sequence_kl(*args)).sum().item() - exact) > 1e-2


def value_z(correction: str, name: str, n: int = 20_000, seed: int = 0) -> float:
    """(mean over n strings drawn from mu - exact KL) / its standard error."""
    p, q, mu = tabular_models()
    tokens, mask = mu.sample(n, torch.Generator().manual_seed(seed))
    stats = stats_of(p, q, tokens, mask).detach()
    weights = importance_weights(stats.logp, token_logp(mu, tokens, mask), mask, correction, cap=2.0)
    values = kl_values(stats, mask, name, weights=weights)
    return (values.mean().item() - exact_kl(p, q).item()) / (values.std().item() / math.sqrt(n))


@pytest.mark.parametrize("name", ["mc", "rb"])
def test_sampled_from_mu_the_weighted_values_are_unbiased_and_the_plain_ones_are_not(name):
    assert abs(value_z("is", name)) < 4
    assert abs(value_z("none", name)) > 6


# -- gradients ------------------------------------------------------------------------------------


def gradient_z(correction: str, name: str, groups: int = 40, per_group: int = 400, seed: int = 0):
    """|mean - exact| / SE of the gradient's projections on the exact gradient and 3 random
    directions, over `groups` batches of strings drawn from mu (leave-one-out baselines, k = K)."""
    p, q, mu = tabular_models()
    (exact,) = torch.autograd.grad(exact_kl(p, q), p.table)
    exact = exact.flatten()
    directions = torch.randn(exact.numel(), 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    directions = torch.cat([exact.unsqueeze(1) / exact.norm(), directions / directions.norm(dim=0)], 1)
    gen, grads = torch.Generator().manual_seed(seed), []
    for _ in range(groups):
        tokens, mask = mu.sample(per_group, gen)
        stats = stats_of(p, q, tokens, mask)
        weights = importance_weights(stats.logp, token_logp(mu, tokens, mask), mask, correction, cap=2.0)
        loss = kl_surrogate(stats, mask, name, group_size=K, weights=weights).mean()
        grads.append(torch.autograd.grad(loss, p.table)[0].flatten())
    proj = torch.stack(grads) @ directions  # [groups, 4]
    sem = proj.std(dim=0) / math.sqrt(groups)
    return ((proj.mean(dim=0) - exact @ directions) / sem).abs()


@pytest.mark.parametrize("name", ["mc", "rb"])
def test_sampled_from_mu_the_weighted_gradients_are_unbiased_and_the_plain_ones_are_not(name):
    assert (gradient_z("is", name) < 4).all()
    assert (gradient_z("none", name) > 6).any()


def test_the_rb_surrogate_is_the_prefix_weighted_gradient_written_out():
    p, q, mu = tabular_models()
    tokens, mask = mu.sample(8 * K, torch.Generator().manual_seed(5))
    stats = stats_of(p, q, tokens, mask)
    weights = ImportanceWeights.of(stats.logp, token_logp(mu, tokens, mask), mask)
    (got,) = torch.autograd.grad(kl_surrogate(stats, mask, "rb", group_size=K, weights=weights).sum(), p.table)
    # Each position's weight is the product of the ratios before it; the baseline at s averages the
    # others' KL to come with the ratios after s only, and is weighted by the ratios through s.
    stats = stats_of(p, q, tokens, mask)
    r = (stats.logp.detach() - token_logp(mu, tokens, mask)).exp() * mask + ~mask  # [B, T]
    kl = stats.kl.detach()
    _, length = tokens.shape
    prefix = torch.stack([r[:, :t].prod(-1) for t in range(length)], -1)
    relative = torch.stack(
        [sum(r[:, s + 1 : t].prod(-1) * kl[:, t] for t in range(s + 1, length)) for s in range(length - 1)]
        + [torch.zeros(len(tokens), dtype=kl.dtype)],
        -1,
    )
    grouped = relative.reshape(-1, K, length)
    baseline = ((grouped.sum(1, keepdim=True) - grouped) / (K - 1)).reshape(relative.shape)
    through = prefix * r
    written = (prefix * stats.kl).sum() + (stats.logp * through * (relative - baseline) * mask).sum()
    (expected,) = torch.autograd.grad(written, p.table)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# -- the loss -------------------------------------------------------------------------------------


def reward_of(tokens, mask):
    return ((tokens == 2) & mask).sum(-1).double() + 0.3 * mask.sum(-1).double()


def small_models(shift: float = 0.6):
    p = TabularLM.random(4, 3, seed=11)
    q = TabularLM.random(4, 3, seed=12)
    noise = torch.randn(p.table.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    mu = TabularLM(p.table + shift * noise, 3)
    p.table.requires_grad_(True)
    return p, q, mu


def target_gradient(p, q):
    tokens, mask = p.strings()
    expected_reward = (p.log_prob(tokens, mask).exp() * reward_of(tokens, mask)).sum()
    (grad,) = torch.autograd.grad(-(expected_reward - BETA * exact_kl(p, q)), p.table)
    return grad


def expected_loss_gradient(p, q, mu, objective, correction="is", old=None):
    """E over (y1, y2) ~ mu x mu of the loss's gradient at p, exactly (k = 2, every ordered pair);
    `old`: the policy the engine served when it sampled, once p has moved on (PPO epochs)."""
    strings, string_mask = p.strings()
    first, second = torch.cartesian_prod(torch.arange(len(strings)), torch.arange(len(strings))).T
    rows = torch.stack([first, second], 1).flatten()
    tokens, mask = strings[rows], string_mask[rows]
    pair_weight = mu.log_prob(tokens, mask).detach().reshape(-1, 2).sum(1).exp()
    stats = stats_of(p, q, tokens, mask)
    weights = importance_weights(stats.logp, token_logp(mu, tokens, mask), mask, correction, cap=2.0)
    old_logp = None if old is None else old.log_prob(tokens, mask).detach()
    parts = rloo_kl_loss(stats, mask, reward_of(tokens, mask), 2, objective, old_logp, weights)
    (grad,) = torch.autograd.grad((pair_weight * parts.per_sample.reshape(-1, 2).mean(1)).sum(), p.table)
    return grad


def relative_error(grad, target):
    return ((grad - target).norm() / target.norm()).item()


OBJECTIVES = [
    Objective(BETA, kl_gradient="mc"),
    Objective(BETA, kl_gradient="rb"),
    Objective(BETA, kl_placement="reward", reward_kl_estimator="mc"),
    Objective(BETA, kl_placement="reward", reward_kl_estimator="rb"),
]


def objective_name(o):
    return f"loss-{o.kl_gradient}" if o.kl_placement == "loss" else f"reward-{o.reward_kl_estimator}"


@pytest.mark.parametrize("objective", OBJECTIVES, ids=objective_name)
def test_the_weighted_loss_gives_exactly_the_regularised_gradient_from_mu_samples(objective):
    p, q, mu = small_models()
    target = target_gradient(p, q)
    assert relative_error(expected_loss_gradient(p, q, mu, objective), target) < 1e-9
    assert relative_error(expected_loss_gradient(p, q, mu, objective, "none"), target) > 1e-2
    # tis trades the bias for bounded weights: a cap of 2 misses here.
    assert relative_error(expected_loss_gradient(p, q, mu, objective, "tis"), target) > 1e-3


@pytest.mark.parametrize("objective", [OBJECTIVES[0], OBJECTIVES[1], OBJECTIVES[3]], ids=objective_name)
def test_later_ppo_epochs_weigh_the_engine_samples_to_the_current_weights(objective):
    # The engine served p_old; p has moved on: rho = p/p_old and p_old/mu together, rb's prefixes p/mu.
    p, q, mu = small_models()
    noise = torch.randn(p.table.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    old = TabularLM(p.table.detach() + 0.3 * noise, 3)
    target = target_gradient(p, q)
    assert relative_error(expected_loss_gradient(p, q, mu, objective, old=old), target) < 1e-9


# -- tis and the options --------------------------------------------------------------------------


def test_tis_truncates_every_weight_at_the_cap():
    p, q, mu = tabular_models(shift=1.5)
    tokens, mask = mu.sample(2000, torch.Generator().manual_seed(6))
    stats = stats_of(p, q, tokens, mask).detach()
    engine_logp = token_logp(mu, tokens, mask)
    plain = importance_weights(stats.logp, engine_logp, mask, "is")
    capped = importance_weights(stats.logp, engine_logp, mask, "tis", cap=2.0)
    assert plain.sequence().max() > 2 and plain.prefix().max() > 2, "the test needs weights above the cap"
    torch.testing.assert_close(capped.sequence(), plain.sequence().clamp(max=2.0))
    torch.testing.assert_close(capped.prefix(), plain.prefix().clamp(max=2.0))
    torch.testing.assert_close(capped.through(), plain.through().clamp(max=2.0))
    torch.testing.assert_close(
        kl_values(stats, mask, "rb", weights=capped), (plain.prefix().clamp(max=2.0) * stats.kl).sum(-1)
    )
    torch.testing.assert_close(
        kl_values(stats, mask, "mc", weights=capped), plain.sequence().clamp(max=2.0) * kl_values(stats, mask, "mc")
    )
    # Bounded weights, bounded spread: truncated MC varies less than the untruncated.
    assert kl_values(stats, mask, "mc", weights=capped).var() < kl_values(stats, mask, "mc", weights=plain).var()


def test_no_correction_leaves_every_value_and_gradient_as_it_was():
    p, q, mu = tabular_models()
    tokens, mask = mu.sample(4 * K, torch.Generator().manual_seed(7))
    stats = stats_of(p, q, tokens, mask)
    assert importance_weights(stats.logp, token_logp(mu, tokens, mask), mask, "none") is None
    # Weights of exactly 1 (mu = p) give the plain estimates: the same formulas, only weighted.
    ones = ImportanceWeights.of(stats.logp, stats.logp.detach(), mask)
    for name in ("mc", "k3", "cv", "rb"):
        torch.testing.assert_close(kl_values(stats, mask, name, weights=ones), kl_values(stats, mask, name))
    for name in ("mc", "rb"):
        got = kl_surrogate(stats, mask, name, group_size=K, weights=ones).sum()
        expected = kl_surrogate(stats, mask, name, group_size=K).sum()
        g1 = torch.autograd.grad(got, p.table, retain_graph=True)[0]
        g2 = torch.autograd.grad(expected, p.table, retain_graph=True)[0]
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"engine_correction": "is"}, "engine hf samples from the policy exactly"),
        ({"engine": "vllm", "engine_correction": "weighted"}, "must be one of none, is, tis"),
        ({"engine": "vllm", "engine_correction": "tis", "engine_correction_cap": 0.5}, "must be >= 1"),
        (
            {"engine": "vllm", "engine_correction": "is", "engine_correction_cap": 5.0},
            "the cap of engine_correction tis",
        ),
    ],
)
def test_bad_engine_corrections_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


def test_the_effective_sample_size_of_the_weights():
    assert effective_sample_size(torch.full((8,), 3.0)).item() == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([0.0, -800.0, -800.0, -800.0])).item() == pytest.approx(1 / 4)
    # Two of four equal, two 0: half the batch.
    assert effective_sample_size(torch.tensor([900.0, 900.0, -1e4, -1e4])).item() == pytest.approx(1 / 2)


def test_a_correction_without_the_engines_log_probs_is_refused():
    stats_logp, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="do not carry"):
        importance_weights(stats_logp, None, mask, "is")


def test_the_module_weighs_its_estimates_and_its_loss_with_the_engines_log_probs():
    torch.manual_seed(0)
    module = RBKLModule(reference="builtin:tiny-gpt2:seed=1", sampling=Sampling(max_new_tokens=5))
    rollout = module.rollout(["the movie was", "a film with"], 2)
    plain = module.model_step(rollout)
    # As if an engine had drawn them from a distribution a little off the policy's.
    mask = rollout.samples.response_mask
    noise = 0.3 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(8))
    engine_logp = (plain.stats.logp.detach() + noise).masked_fill(~mask, 0.0)
    engine_rollout = dataclasses.replace(rollout, samples=dataclasses.replace(rollout.samples, engine_logp=engine_logp))
    module.sampling = Sampling(max_new_tokens=5, engine="vllm", engine_correction="is")  # not started: no vLLM needed
    out = module.model_step(engine_rollout)
    weights = ImportanceWeights.of(out.stats.logp, engine_logp, mask)
    for name in ("mc", "rb"):
        torch.testing.assert_close(out.values[name], kl_values(out.stats.detach(), mask, name, weights=weights))
        assert not torch.allclose(out.values[name], plain.values[name])
    expected = rloo_kl_loss(out.stats, mask, rollout.rewards, 2, module.objective, weights=weights)
    torch.testing.assert_close(out.loss.per_sample, expected.per_sample)
    # The engine's own distribution equal to the policy's: weights 1, the plain step.
    same = dataclasses.replace(rollout.samples, engine_logp=plain.stats.logp.detach().masked_fill(~mask, 0.0))
    torch.testing.assert_close(
        module.model_step(dataclasses.replace(rollout, samples=same)).values["rb"], plain.values["rb"]
    )
