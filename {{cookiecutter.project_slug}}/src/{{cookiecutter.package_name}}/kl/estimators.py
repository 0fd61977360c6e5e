"""Estimators of KL(p || q) between a policy p and a reference q, and of its gradient.

Pure PyTorch, no Lightning. Implements docs/estimators.md §3-4 with this contract:

    sequence_kl(policy_logits, ref_logits, tokens, mask, estimator) -> Tensor[B]
    kl_grad_surrogate(policy_logits, ref_logits, tokens, mask, estimator) -> Tensor[B]

Value estimators for one response y ~ p (d_t = log p(y_t|y_<t) - log q(y_t|y_<t)):

    mc  sum_t d_t                               unbiased, can be negative ("k1")
    k2  sum_t d_t^2 / 2                         biased, >= 0
    k3  sum_t (exp(-d_t) - 1 + d_t)             unbiased when q > 0 wherever p > 0, >= 0
                                                (Schulman, per token)
    cv  f + alpha (exp(-f) - 1), f = sum_t d_t  unbiased for an alpha independent of the sample,
                                                when q > 0 wherever p > 0
    rb  sum_t KL_t                              unbiased, >= 0: the Rao-Blackwellized
                                                estimator of Amini, Vieira & Cotterell (2025)

k3 and cv rest on E_p[q(y)/p(y)] = 1, which fails when q puts mass where p has none (-inf
policy logits, a masked vocabulary): then E_p[q/p] = q(supp p) < 1 and both are biased. mc and
rb are not. Training also logs `cv_opt`: cv with the variance-minimising alpha fitted, for each
prompt, on the OTHER prompts' samples of the batch (cross-fitting), which keeps it unbiased;
alpha fitted on the samples it is applied to is badly biased at small sample sizes.

RB is a sum of per-step conditional expectations E[d_t | y_<t] = KL_t. That removes the
variance of each step's token, but not always the variance of the whole sequence: for some pairs
of models Var[rb] > Var[mc] (docs/estimators.md §3). Measure, don't assume.

Samples drawn from another distribution mu (an inference engine's) are weighted back to p with
`weights` (correction.py, docs/estimators.md §12): rb per prefix, every other estimator per response.

The module computes `token_stats` once per batch and derives every estimate from it with
`kl_values` and `kl_surrogate`; the two contract functions are thin wrappers for one estimator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .correction import ImportanceWeights, importance_weights, relative_to_go
from .token_stats import TokenStats, masked_token_stats

VALUE_ESTIMATORS = ("mc", "k2", "k3", "cv", "rb")
GRADIENT_ESTIMATORS = ("mc", "rb")
# What training logs: every value estimator, plus cv with a cross-fitted alpha (see above).
LOGGED_ESTIMATORS = (*VALUE_ESTIMATORS, "cv_opt")


def check_estimator(name: str, valid: tuple[str, ...] = VALUE_ESTIMATORS) -> None:
    if name not in valid:
        raise ValueError(f"unknown KL estimator {name!r}; valid names are {', '.join(valid)}")


def kl_values(
    stats: TokenStats,
    mask: Tensor,
    estimator: str,
    *,
    alpha: float | Tensor = 1.0,
    weights: ImportanceWeights | None = None,
) -> Tensor:
    """Per-sequence value of one estimator, [B], from masked token statistics.

    `alpha` (cv only) is a number or a [B] tensor; it must not depend on the sample it weights.
    `weights`: the samples came from an engine's mu, not p (correction.py, docs/estimators.md §12):
    rb weighs each KL_t by its prefix's weight, every other estimator takes the sequence's.
    """
    check_estimator(estimator)
    if estimator == "rb":
        if weights is None:
            return stats.kl.sum(-1)
        return (weights.prefix(stats.kl.dtype) * stats.kl).sum(-1)
    d = stats.logp - stats.logq  # [B, T], 0 on padding
    if estimator == "mc":
        value = d.sum(-1)
    elif estimator == "k2":
        value = (d.square() / 2).sum(-1)
    elif estimator == "k3":
        value = (torch.expm1(-d) + d).sum(-1)
    else:
        f = d.sum(-1)
        g = torch.expm1(-f)  # E_p[q(y)/p(y)] - 1 = 0 under full support: a zero-mean control variate
        value = f + alpha * g
    return value if weights is None else weights.sequence(value.dtype) * value


def cross_fitted_alpha(f: Tensor, g: Tensor, group_size: int) -> Tensor:
    """[B] control-variate coefficients, each fitted without the sample's own prompt.

    f, g: [B], group_size adjacent samples per prompt. For prompt i,
    alpha_i = -sum_{l != i} C_fg(l) / sum_{l != i} C_gg(l), with C the within-prompt centred
    cross-products: the alpha that minimises the within-prompt variance, estimated on samples
    independent of prompt i's, so E[alpha_i g_ij] = E[alpha_i] E[g_ij] = 0. A prompt alone in its
    batch gets alpha 0 (plain mc).
    """
    fg = f.detach().double().reshape(-1, group_size)  # [n, k]
    gg = g.detach().double().reshape(-1, group_size)  # [n, k]
    fc, gc = fg - fg.mean(1, keepdim=True), gg - gg.mean(1, keepdim=True)
    c_fg, c_gg = (fc * gc).sum(1), gc.square().sum(1)  # [n]
    num, den = c_fg.sum() - c_fg, c_gg.sum() - c_gg  # [n] over the other prompts
    alpha = torch.where(den > 0, -num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.zeros_like(den))
    return alpha.repeat_interleave(group_size).to(f.dtype)


def all_kl_values(
    stats: TokenStats, mask: Tensor, group_size: int, weights: ImportanceWeights | None = None
) -> dict[str, Tensor]:
    """Every value estimator on the same samples (detached), plus cv with a cross-fitted alpha.

    With `weights` each is importance-weighted (`kl_values`), and cv_opt's alpha is fitted to the
    weighted f and g: W (f + alpha g) is cv on W f with the control variate W g, still of mean 0.
    """
    stats = stats.detach()
    values = {name: kl_values(stats, mask, name, weights=weights) for name in VALUE_ESTIMATORS}
    f = values["mc"]
    if weights is None:
        g = torch.expm1(-f)
    else:
        g = weights.sequence(f.dtype) * torch.expm1(-kl_values(stats, mask, "mc"))
    alpha = cross_fitted_alpha(f, g, group_size)
    values["cv_opt"] = kl_values(stats, mask, "cv", alpha=alpha, weights=weights)
    return values


def kl_to_go(kl: Tensor) -> Tensor:
    """[B, T] -> [B, T]: the KL still to come after each position, sum_{t > s} KL_t."""
    return kl.flip(-1).cumsum(-1).flip(-1) - kl


def leave_one_out_mean(values: Tensor, k: int) -> Tensor:
    """[N, ...] grouped as N/k prompts with k adjacent samples -> mean over the other k-1 samples."""
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 samples per prompt, got {k}")
    if values.shape[0] % k:
        raise ValueError(f"{values.shape[0]} samples do not split into groups of {k}")
    grouped = values.reshape(-1, k, *values.shape[1:])
    return ((grouped.sum(1, keepdim=True) - grouped) / (k - 1)).reshape(values.shape)


def kl_surrogate(
    stats: TokenStats,
    mask: Tensor,
    estimator: str,
    *,
    baseline: Tensor | None = None,
    group_size: int | None = None,
    weights: ImportanceWeights | None = None,
) -> Tensor:
    """Per-sample surrogate [B] whose gradient, averaged over y ~ p, is grad KL(p || q).

    mc: sum_s logp_s * [sum_t d_t - b]                    (score function; E[grad f] = 0 dropped)
    rb: sum_t KL_t + sum_s logp_s * [sum_{t>s} KL_t - b]  (pathwise + causal score function)

    The baseline b must not depend on the sample it is subtracted from; it keeps the estimate
    unbiased and lowers its variance. `group_size` k: b is the same weight's mean over the other
    k - 1 samples of the prompt (k adjacent samples each, per position for rb); or `baseline`
    ([B], or [B, T] per position) gives b directly.

    `weights` (samples from an engine's mu, docs/estimators.md §12): averaged over y ~ mu instead,
    with W the sequence weight, W_<t the prefix weight and b as above from the other samples:

    mc: sum_s logp_s * W [sum_t d_t - b]
    rb: sum_t W_<t KL_t + sum_s logp_s * [sum_{t>s} W_<t KL_t - W_<=s b_s]

    where rb's b_s averages the others' sum_{t>s} W_<t KL_t / W_<=s, the KL to come after y_<=s.
    """
    check_estimator(estimator, GRADIENT_ESTIMATORS)
    if estimator == "rb" and stats.logp.requires_grad and not stats.kl.requires_grad:
        # Without its pathwise term the rb surrogate is biased, and nothing else would say so.
        raise ValueError(
            "the 'rb' KL gradient needs the per-token KL to be differentiable: compute the token "
            "statistics with kl_grad=True"
        )
    if weights is not None:
        return _weighted_kl_surrogate(stats, mask, estimator, baseline, group_size, weights)
    if estimator == "mc":
        weight = (stats.logp - stats.logq).detach().sum(-1, keepdim=True)  # [B, 1]
    else:
        weight = kl_to_go(stats.kl.detach())  # [B, T]
    score = (stats.logp * (weight - _baselines(weight, baseline, group_size)) * mask).sum(-1)
    if estimator == "mc":
        return score
    return stats.kl.sum(-1) + score


def _baselines(weight: Tensor, baseline: Tensor | None, group_size: int | None) -> Tensor | float:
    """What is subtracted from each score-function weight: [B, 1] or [B, T] (or 0)."""
    b: Tensor | float = 0.0
    if group_size is not None:
        b = b + leave_one_out_mean(weight, group_size)
    if baseline is not None:
        given = baseline.detach()
        b = b + (given.unsqueeze(-1) if given.dim() == 1 else given)
    return b


def _weighted_kl_surrogate(
    stats: TokenStats,
    mask: Tensor,
    estimator: str,
    baseline: Tensor | None,
    group_size: int | None,
    weights: ImportanceWeights,
) -> Tensor:
    # The baseline is weighted like the term it is subtracted from: E_mu[W_<=s grad logp_s] =
    # E_p[grad logp_s] = 0, so W_<=s b_s has mean zero for any b_s the own sample does not enter.
    dtype = stats.logp.dtype
    if estimator == "mc":
        f = (stats.logp - stats.logq).detach().double().sum(-1, keepdim=True)  # [B, 1]
        coefficient = weights.sequence().unsqueeze(-1) * (f - _baselines(f, baseline, group_size))
        return (stats.logp * coefficient.to(dtype) * mask).sum(-1)
    prefix, through = weights.prefix(), weights.through()  # [B, T] each, float64
    to_go = kl_to_go(prefix * stats.kl.detach().double())  # [B, T]: sum_{t>s} W_<t KL_t
    coefficient = to_go - through * _baselines(relative_to_go(to_go, through), baseline, group_size)
    score = (stats.logp * coefficient.to(dtype) * mask).sum(-1)
    return (prefix.to(dtype) * stats.kl).sum(-1) + score


def sequence_kl(
    policy_logits: Tensor,
    ref_logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    estimator: str,
    *,
    alpha: float = 1.0,
    chunk_rows: int | None = None,
    inplace: bool = False,
    engine_logp: Tensor | None = None,
    cap: float | None = None,
) -> Tensor:
    """Estimate KL(p || q) for each sampled response: Tensor[B].

    Args:
        policy_logits: [B, T, V]; position t holds the next-token logits that produced tokens[:, t].
        ref_logits: [B, T, V] reference logits at the same positions.
        tokens: [B, T] long, the sampled response.
        mask: [B, T] bool, True up to and including the EOS that ended the response.
        estimator: one of "mc", "k2", "k3", "cv", "rb".
        alpha: control-variate coefficient for "cv" (alpha = 1 can have exploding variance).
        chunk_rows: positions processed at once by the fused op (None: about 2M logits).
        inplace: the logits are scratch that nothing else reads (fresh LM-head outputs): the op
            may overwrite them instead of allocating [B, T, V] buffers (token_stats.py).
        engine_logp: [B, T] log mu(y_t | y_<t) when the responses were drawn from another
            distribution mu: the estimate is importance-weighted to p (correction.py).
        cap: with engine_logp, truncate every weight at cap (truncated IS: biased, bounded).
    """
    check_estimator(estimator)
    stats = _stats_for(estimator, policy_logits, ref_logits, tokens, mask, chunk_rows, inplace)
    weights = _weights_for(stats, engine_logp, mask, cap)
    return kl_values(stats, mask, estimator, alpha=alpha, weights=weights)


def kl_grad_surrogate(
    policy_logits: Tensor,
    ref_logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    estimator: str,
    *,
    baseline: Tensor | None = None,
    chunk_rows: int | None = None,
    inplace: bool = False,
    engine_logp: Tensor | None = None,
    cap: float | None = None,
) -> Tensor:
    """Per-sample surrogates [B] whose autograd gradient is an unbiased estimate of grad KL.

    Differentiate `kl_grad_surrogate(...).mean()` w.r.t. the parameters that produced
    `policy_logits`. The forward value is not the KL. Arguments as in `sequence_kl`;
    `estimator` is "mc" or "rb" (causal KL-to-go form, docs/estimators.md §4); with `engine_logp`
    the responses came from mu and the average is over y ~ mu (docs/estimators.md §12).
    """
    check_estimator(estimator, GRADIENT_ESTIMATORS)
    stats = _stats_for(estimator, policy_logits, ref_logits, tokens, mask, chunk_rows, inplace)
    weights = _weights_for(stats, engine_logp, mask, cap)
    return kl_surrogate(stats, mask, estimator, baseline=baseline, weights=weights)


def _weights_for(
    stats: TokenStats, engine_logp: Tensor | None, mask: Tensor, cap: float | None
) -> ImportanceWeights | None:
    if engine_logp is None:
        if cap is not None:
            raise ValueError("cap truncates importance weights, which need engine_logp")
        return None
    return importance_weights(stats.logp, engine_logp, mask, "is" if cap is None else "tis", cap)


def _stats_for(
    estimator: str,
    policy_logits: Tensor,
    ref_logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    chunk_rows: int | None,
    inplace: bool,
) -> TokenStats:
    # Only rb reads the per-token KL's gradient; the others skip the reference in backward.
    kl_grad = estimator == "rb"
    return masked_token_stats(
        policy_logits, ref_logits, tokens, mask, kl_grad=kl_grad, chunk_rows=chunk_rows, inplace=inplace
    )
