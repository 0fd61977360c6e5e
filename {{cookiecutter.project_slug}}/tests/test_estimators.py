"""The KL estimators against exact answers from enumerating every string of tiny models."""

import math

import pytest
import torch
from tabular_lm import EOS, TabularLM, exact_kl, exact_mean_var

from {{ cookiecutter.package_name }}.kl.estimators import (
    GRADIENT_ESTIMATORS,
    VALUE_ESTIMATORS,
    kl_grad_surrogate,
    sequence_kl,
)

VOCAB, MAX_LEN = 5, 4


@pytest.fixture(scope="module")
def models():
    p = TabularLM.random(VOCAB, MAX_LEN, seed=1)
    q = TabularLM.random(VOCAB, MAX_LEN, seed=2)
    return p, q


def naive_values(p: TabularLM, q: TabularLM, tokens, mask) -> dict[str, torch.Tensor]:
    """Each estimator per string, written out from docs/estimators.md §3 with full log-softmaxes."""
    logp_all = torch.log_softmax(p.logits(tokens), -1)
    logq_all = torch.log_softmax(q.logits(tokens), -1)
    idx = tokens.unsqueeze(-1)
    d = (logp_all.gather(-1, idx) - logq_all.gather(-1, idx)).squeeze(-1) * mask
    kl_t = (logp_all.exp() * (logp_all - logq_all)).sum(-1) * mask
    f = d.sum(-1)
    return {
        "mc": f,
        "k2": (d**2 / 2).sum(-1),
        "k3": ((torch.exp(-d) - 1 + d) * mask).sum(-1),
        "cv": f + (torch.exp(-f) - 1),
        "rb": kl_t.sum(-1),
    }


def test_tabular_lm_is_a_distribution_with_both_kinds_of_strings(models):
    p, _ = models
    tokens, mask = p.strings()
    assert math.isclose(p.log_prob(tokens, mask).exp().sum().item(), 1.0, abs_tol=1e-12)
    ends_with_eos = (tokens.gather(1, mask.sum(1, keepdim=True) - 1) == EOS).squeeze(1)
    assert ends_with_eos.any() and (~ends_with_eos).any()


def test_values_equal_the_written_out_formulas_on_every_string(models):
    p, q = models
    tokens, mask = p.strings()
    expected = naive_values(p, q, tokens, mask)
    for name in VALUE_ESTIMATORS:
        got = sequence_kl(p.logits(tokens), q.logits(tokens), tokens, mask, name)
        torch.testing.assert_close(got, expected[name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("name, alpha", [("mc", 1.0), ("k3", 1.0), ("rb", 1.0), ("cv", 1.0), ("cv", 0.3)])
def test_unbiased_estimators_match_exact_kl(models, name, alpha):
    p, q = models
    exact = exact_kl(p, q).item()
    tokens, mask = p.sample(20_000, torch.Generator().manual_seed(0))
    values = sequence_kl(p.logits(tokens), q.logits(tokens), tokens, mask, name, alpha=alpha)
    sem = values.std().item() / math.sqrt(len(values))
    assert abs(values.mean().item() - exact) < 4 * sem, (values.mean().item(), exact, sem)


def test_k2_is_biased(models):
    p, q = models
    exact = exact_kl(p, q).item()
    tokens, mask = p.strings()
    k2_mean, _ = exact_mean_var(p, naive_values(p, q, tokens, mask)["k2"])
    samples, smask = p.sample(20_000, torch.Generator().manual_seed(1))
    values = sequence_kl(p.logits(samples), q.logits(samples), samples, smask, "k2")
    sem = values.std().item() / math.sqrt(len(values))
    assert abs(values.mean().item() - k2_mean) < 4 * sem
    assert abs(values.mean().item() - exact) > 10 * sem, "k2 should be visibly biased here"


def test_rb_and_k3_are_never_negative_and_mc_sometimes_is(models):
    p, q = models
    tokens, mask = p.strings()
    args = (p.logits(tokens), q.logits(tokens), tokens, mask)
    assert (sequence_kl(*args, "rb") >= 0).all()
    assert (sequence_kl(*args, "k3") >= 0).all()
    assert (sequence_kl(*args, "mc") < 0).any()


def test_design_counterexample_rb_has_higher_variance_than_mc():
    # docs/estimators.md §3. Vocabulary: EOS, a, b, c, z. Strings "a z EOS" and "b z EOS".
    ninf, log = float("-inf"), math.log
    eos, a, b, c, z = range(5)
    tokens = torch.tensor([[a, z, eos], [b, z, eos]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    p = torch.full((2, 3, 5), ninf, dtype=torch.float64)
    q = torch.full((2, 3, 5), ninf, dtype=torch.float64)
    p[:, 0, a] = p[:, 0, b] = log(0.5)
    p[:, 1, z] = 0.0
    p[:, 2, eos] = 0.0
    q[:, 0, a], q[:, 0, b], q[:, 0, c] = log(0.5), log(0.25), log(0.25)
    q[0, 1, z] = q[0, 1, c] = log(0.5)
    q[1, 1, z] = 0.0
    q[:, 2, eos] = 0.0
    mc = sequence_kl(p, q, tokens, mask, "mc")
    rb = sequence_kl(p, q, tokens, mask, "rb")
    torch.testing.assert_close(mc, torch.full((2,), log(2), dtype=torch.float64))
    torch.testing.assert_close(rb, torch.tensor([1.5 * log(2), 0.5 * log(2)], dtype=torch.float64))
    # Both strings have probability 1/2: population variances.
    assert mc.var(unbiased=False).item() == pytest.approx(0.0, abs=1e-12)
    assert rb.var(unbiased=False).item() == pytest.approx((0.5 * log(2)) ** 2, rel=1e-9)
    assert rb.var(unbiased=False) > mc.var(unbiased=False)


def _grouped_gradients(p, q, surrogate, groups=40, per_group=500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(groups):
        tokens, mask = p.sample(per_group, gen)
        loss = surrogate(p.logits(tokens), q.logits(tokens), tokens, mask).mean()
        (grad,) = torch.autograd.grad(loss, p.table)
        grads.append(grad.flatten())
    return torch.stack(grads)  # [G, D]


def _loo_surrogate(name):
    def surrogate(policy_logits, ref_logits, tokens, mask):
        with torch.no_grad():
            value = sequence_kl(policy_logits, ref_logits, tokens, mask, name)
            baseline = (value.sum() - value) / (len(value) - 1)  # independent of the own sample
        return kl_grad_surrogate(policy_logits, ref_logits, tokens, mask, name, baseline=baseline)

    return surrogate


def _plain_surrogate(name):
    return lambda *args: kl_grad_surrogate(*args, name)


def _pathwise_only(policy_logits, ref_logits, tokens, mask):
    # Deliberately wrong: drops the score-function term of the RB gradient.
    return sequence_kl(policy_logits, ref_logits, tokens, mask, "rb")


def _gradient_z_scores(surrogate):
    p = TabularLM.random(VOCAB, MAX_LEN, seed=1)
    q = TabularLM.random(VOCAB, MAX_LEN, seed=2)
    p.table.requires_grad_(True)
    (exact,) = torch.autograd.grad(exact_kl(p, q), p.table)
    exact = exact.flatten()
    directions = torch.randn(exact.numel(), 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    directions = torch.cat([exact.unsqueeze(1) / exact.norm(), directions / directions.norm(dim=0)], 1)
    proj = _grouped_gradients(p, q, surrogate) @ directions  # [G, 4]
    sem = proj.std(dim=0) / math.sqrt(proj.shape[0])
    return ((proj.mean(dim=0) - exact @ directions) / sem).abs()


@pytest.mark.parametrize(
    "surrogate",
    [_plain_surrogate("mc"), _plain_surrogate("rb"), _loo_surrogate("mc"), _loo_surrogate("rb")],
    ids=["mc", "rb", "mc-loo", "rb-loo"],
)
def test_gradient_surrogates_are_unbiased(surrogate):
    assert (_gradient_z_scores(surrogate) < 4).all()


def test_the_gradient_check_rejects_a_pathwise_only_surrogate():
    assert (_gradient_z_scores(_pathwise_only) > 4).any()


def test_padding_ids_never_change_a_result_and_the_eos_step_counts(models):
    p, q = models
    tokens, mask = p.sample(64, torch.Generator().manual_seed(5))
    assert (~mask).any()
    garbage = tokens.clone()
    garbage[~mask] = torch.randint(-100, 10_000, (int((~mask).sum()),))

    # Logits at padded positions are garbage too: the model sees the garbage prefix.
    def noisy(lm):
        junk = torch.randn(*tokens.shape, VOCAB, dtype=torch.float64)
        return torch.where(mask.unsqueeze(-1), lm.logits(tokens), junk)

    for name in VALUE_ESTIMATORS:
        clean = sequence_kl(p.logits(tokens), q.logits(tokens), tokens, mask, name)
        dirty = sequence_kl(noisy(p), noisy(q), garbage, mask, name)
        torch.testing.assert_close(clean, dirty, rtol=0, atol=0, msg=name)
    for name in GRADIENT_ESTIMATORS:
        logits = p.logits(tokens).detach().requires_grad_(True)
        (clean,) = torch.autograd.grad(kl_grad_surrogate(logits, q.logits(tokens), tokens, mask, name).sum(), logits)
        (dirty,) = torch.autograd.grad(kl_grad_surrogate(logits, noisy(q), garbage, mask, name).sum(), logits)
        torch.testing.assert_close(clean, dirty, rtol=0, atol=0)
        assert (clean[~mask] == 0).all()
    # The EOS step is part of the string's distribution: dropping it from the mask changes rb.
    ends = tokens.gather(1, mask.sum(1, keepdim=True) - 1).squeeze(1) == EOS
    no_eos = mask.clone()
    no_eos[torch.arange(len(mask)), mask.sum(1) - 1] = False
    with_eos = sequence_kl(p.logits(tokens), q.logits(tokens), tokens, mask, "rb")
    without = sequence_kl(p.logits(tokens), q.logits(tokens), tokens, no_eos, "rb")
    expected = naive_values(p, q, tokens, mask)["rb"]
    torch.testing.assert_close(with_eos, expected, rtol=0, atol=1e-12)
    assert (with_eos[ends] > without[ends]).all()


def _args(b=2, t=3, v=5, dtype=torch.float32):
    logits = torch.randn(b, t, v, dtype=dtype)
    return logits, torch.randn(b, t, v, dtype=dtype), torch.randint(0, v, (b, t)), torch.ones(b, t, dtype=torch.bool)


@pytest.mark.parametrize("fn", [sequence_kl, kl_grad_surrogate])
def test_unknown_estimator_lists_the_valid_names(fn):
    valid = VALUE_ESTIMATORS if fn is sequence_kl else GRADIENT_ESTIMATORS
    with pytest.raises(ValueError, match=", ".join(valid)):
        fn(*_args(), "k4")


def test_k3_has_no_gradient_estimator():
    with pytest.raises(ValueError, match="mc, rb"):
        kl_grad_surrogate(*_args(), "k3")


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: (a[0], a[1][..., :4], a[2], a[3]), ValueError, "vocabulary sizes differ"),
        (lambda a: (a[0], a[1][:1], a[2], a[3]), ValueError, "shapes differ"),
        (lambda a: (a[0], a[1], a[2][:, :2], a[3]), ValueError, r"must both be \[B, T\]"),
        (lambda a: (a[0], a[1], a[2], a[3][:1]), ValueError, r"must both be \[B, T\]"),
        (lambda a: (a[0][0], a[1][0], a[2], a[3]), ValueError, r"\[B, T, V\]"),
        (lambda a: (a[0], a[1], a[2].int(), a[3]), TypeError, "torch.long"),
        (lambda a: (a[0], a[1], a[2], a[3].float()), TypeError, "torch.bool"),
        (lambda a: (a[0].long(), a[1], a[2], a[3]), TypeError, "floating point"),
        (lambda a: (a[0], a[1], a[2] + 5, a[3]), ValueError, "vocabulary"),
    ],
)
@pytest.mark.parametrize("fn", [sequence_kl, kl_grad_surrogate])
def test_bad_inputs_raise_clear_errors(fn, mutate, error, match):
    with pytest.raises(error, match=match):
        fn(*mutate(_args()), "mc")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("name", ["mc", "rb"])
def test_non_finite_logits_raise(bad, which, name):
    args = list(_args())
    args[which][1, 2, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        sequence_kl(*args, name)
    with pytest.raises(ValueError, match="non-finite"):
        kl_grad_surrogate(*args, name)


@pytest.mark.parametrize("which", ["policy", "reference"])
@pytest.mark.parametrize("poison", ["-inf", "nan"])
@pytest.mark.parametrize("estimator", GRADIENT_ESTIMATORS)
def test_masked_positions_never_make_a_gradient_nan(which, poison, estimator):
    # A padding position (mask False) whose logits are -inf somewhere, or NaN, in either model: the
    # gradient stays what it is with ordinary logits there, with or without an unrelated row
    # elsewhere in the batch that needs the op's slow path (a -inf logit under the mask).
    gen = torch.Generator().manual_seed(5)
    policy = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    ref = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 6, (3, 4), generator=gen)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 3] = False  # the padding position
    grads = {}
    for case in ("clean", "poisoned", "poisoned+slow row"):
        p, q = policy.clone(), ref.clone()
        target = p if which == "policy" else q
        if case != "clean":
            target[0, 3, 2] = float(poison)
        if case == "poisoned+slow row":
            v = int(tokens[2, 1])
            p[2, 1, (v + 1) % 6] = float("-inf")
        leaf = p.requires_grad_(True)
        surrogate = kl_grad_surrogate(leaf, q, tokens, mask, estimator)
        surrogate.sum().backward()
        assert torch.isfinite(leaf.grad).all(), case
        grads[case] = leaf.grad
    torch.testing.assert_close(grads["poisoned"], grads["clean"], rtol=0, atol=1e-12)
    assert torch.isfinite(grads["poisoned+slow row"]).all()
    assert (grads["poisoned"][0, 3] == 0).all(), "a masked position gets no gradient"


def test_an_rb_surrogate_without_the_pathwise_term_is_refused(models):
    from {{ cookiecutter.package_name }}.kl.estimators import kl_surrogate
    from {{ cookiecutter.package_name }}.kl.token_stats import masked_token_stats

    p, q = models
    tokens, mask = p.strings()
    logits = p.logits(tokens).requires_grad_(True)
    stats = masked_token_stats(logits, q.logits(tokens), tokens, mask, kl_grad=False)
    with pytest.raises(ValueError, match="kl_grad=True"):
        kl_surrogate(stats, mask, "rb")
    kl_surrogate(stats, mask, "mc")  # the score function alone needs no pathwise term


def test_the_public_functions_equal_themselves_under_bf16_autocast(models):
    p, q = models
    tokens, mask = p.sample(64, torch.Generator().manual_seed(6))
    policy = p.logits(tokens).float()
    ref = (q.logits(tokens) + 25.0).float()  # shifted: the softmax is the same, the terms are large
    for estimator in VALUE_ESTIMATORS:
        plain = sequence_kl(policy, ref, tokens, mask, estimator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = sequence_kl(policy, ref, tokens, mask, estimator)
        torch.testing.assert_close(mixed, plain, rtol=1e-5, atol=1e-5, msg=estimator)
    for estimator in GRADIENT_ESTIMATORS:
        grads = []
        for autocast in (False, True):
            leaf = policy.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                kl_grad_surrogate(leaf, ref, tokens, mask, estimator).mean().backward()
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5, msg=estimator)
