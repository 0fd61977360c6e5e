"""Estimators of KL(p || q) between a policy p and a reference q, and of its gradient.

Pure PyTorch, no Lightning. Implements docs/estimators.md §3-4 with this contract:

    sequence_kl(policy_logits, ref_logits, tokens, mask, estimator) -> Tensor[B]
    kl_grad_surrogate(policy_logits, ref_logits, tokens, mask, estimator) -> Tensor[B]

Value estimators for one response y ~ p (d_t = log p(y_t|y_<t) - log q(y_t|y_<t)):

    mc  sum_t d_t                               unbiased, can be negative ("k1")
    k2  sum_t d_t^2 / 2                         biased, >= 0
    k3  sum_t (exp(-d_t) - 1 + d_t)             unbiased, >= 0 (Schulman, per token)
    cv  f + alpha (exp(-f) - 1), f = sum_t d_t  unbiased for a fixed alpha; alpha="optimal"
                                                estimates -Cov(f, g)/Var(g) from the batch
    rb  sum_t KL_t                              unbiased, >= 0: the Rao-Blackwellized
                                                estimator of Amini, Vieira & Cotterell (2025)

RB is a sum of per-step conditional expectations E[d_t | y_<t] = KL_t. That removes the
variance of each step's token, but not always the variance of the whole sequence: for some pairs
of models Var[rb] > Var[mc] (docs/estimators.md §3). Measure, don't assume.

The module computes `token_stats` once per batch and derives every estimate from it with
`kl_values` and `kl_surrogate`; the two contract functions are thin wrappers for one estimator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .token_stats import TokenStats, token_stats

VALUE_ESTIMATORS = ("mc", "k2", "k3", "cv", "rb")
GRADIENT_ESTIMATORS = ("mc", "rb")
# What training logs: every value estimator, plus cv with the batch-optimal alpha.
LOGGED_ESTIMATORS = (*VALUE_ESTIMATORS, "cv_opt")


def check_estimator(name: str, valid: tuple[str, ...] = VALUE_ESTIMATORS) -> None:
    if name not in valid:
        raise ValueError(f"unknown KL estimator {name!r}; valid names are {', '.join(valid)}")


def check_inputs(policy_logits: Tensor, ref_logits: Tensor, tokens: Tensor, mask: Tensor) -> None:
    """Raise a clear error for shapes, dtypes or ids that would otherwise broadcast or misindex."""
    if policy_logits.dim() != 3:
        raise ValueError(f"policy_logits must be [B, T, V], got shape {tuple(policy_logits.shape)}")
    if ref_logits.shape != policy_logits.shape:
        what = "vocabulary sizes" if ref_logits.shape[:-1] == policy_logits.shape[:-1] else "shapes"
        raise ValueError(
            f"policy_logits and ref_logits {what} differ: {tuple(policy_logits.shape)} vs "
            f"{tuple(ref_logits.shape)}; policy and reference must share one vocabulary"
        )
    if not policy_logits.is_floating_point() or not ref_logits.is_floating_point():
        raise TypeError("policy_logits and ref_logits must be floating point tensors")
    if tokens.shape != policy_logits.shape[:-1] or mask.shape != tokens.shape:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must both be [B, T] = "
            f"{tuple(policy_logits.shape[:-1])}"
        )
    if tokens.dtype != torch.long:
        raise TypeError(f"tokens must be torch.long, got {tokens.dtype}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be torch.bool, got {mask.dtype}")
    vocab = policy_logits.shape[-1]
    live = tokens[mask]
    if live.numel() and (live.min() < 0 or live.max() >= vocab):
        raise ValueError(f"tokens under the mask must lie in [0, {vocab}), the vocabulary")


def masked_token_stats(
    policy_logits: Tensor,
    ref_logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    *,
    kl_grad: bool = True,
    chunk_rows: int | None = None,
    inplace_grad: bool = False,
) -> TokenStats:
    """`token_stats` after validation, with padding zeroed so it never changes a result."""
    check_inputs(policy_logits, ref_logits, tokens, mask)
    # Padding may hold any id (GPT-2 pads with EOS, others with -100): replace it by a valid one.
    safe_tokens = tokens.masked_fill(~mask, 0)
    stats = token_stats(
        policy_logits, ref_logits, safe_tokens, kl_grad=kl_grad, chunk_rows=chunk_rows, inplace_grad=inplace_grad
    )
    _check_finite(stats, mask)
    zero = torch.zeros((), dtype=stats.kl.dtype, device=mask.device)
    return TokenStats(
        logp=torch.where(mask, stats.logp, zero),
        logq=torch.where(mask, stats.logq, zero),
        kl=torch.where(mask, stats.kl, zero),
        entropy=torch.where(mask, stats.entropy, zero),
    )


def _check_finite(stats: TokenStats, mask: Tensor) -> None:
    # NaN or +inf logits poison the log-normaliser and hence logp/logq; -inf logits are allowed
    # (masked vocabulary) unless the sampled token has zero probability.
    if not torch.isfinite(stats.logp[mask]).all() or not torch.isfinite(stats.logq[mask]).all():
        raise ValueError(
            "non-finite log-probabilities: the logits contain NaN/inf, or a sampled token has "
            "zero probability under the policy or the reference"
        )
    if not torch.isfinite(stats.kl[mask]).all():
        raise ValueError("infinite KL: the reference gives zero probability to a token the policy can sample")


def kl_values(stats: TokenStats, mask: Tensor, estimator: str, *, alpha: float | str = 1.0) -> Tensor:
    """Per-sequence value of one estimator, [B], from masked token statistics."""
    check_estimator(estimator)
    if estimator == "rb":
        return stats.kl.sum(-1)
    d = stats.logp - stats.logq  # [B, T], 0 on padding
    if estimator == "mc":
        return d.sum(-1)
    if estimator == "k2":
        return (d.square() / 2).sum(-1)
    if estimator == "k3":
        return (torch.expm1(-d) + d).sum(-1)
    f = d.sum(-1)
    g = torch.expm1(-f)  # E_p[q(y)/p(y)] - 1 = 0: a zero-mean control variate
    return f + cv_alpha(f, g, alpha) * g


def cv_alpha(f: Tensor, g: Tensor, alpha: float | str) -> float:
    """The control-variate coefficient: a fixed number, or "optimal" = -Cov(f, g)/Var(g).

    The batch estimate of the optimal alpha uses the same samples it is applied to, so the cv
    estimate with alpha="optimal" is consistent but slightly biased at small batch sizes.
    """
    if not isinstance(alpha, str):
        return float(alpha)
    if alpha != "optimal":
        raise ValueError(f"alpha must be a number or 'optimal', got {alpha!r}")
    f, g = f.detach().double(), g.detach().double()
    if f.numel() < 2:
        return 1.0
    var_g = g.var()
    if var_g <= 0:
        return 0.0
    cov = ((f - f.mean()) * (g - g.mean())).sum() / (f.numel() - 1)
    return (-cov / var_g).item()


def all_kl_values(stats: TokenStats, mask: Tensor) -> dict[str, Tensor]:
    """Every value estimator on the same samples (detached), plus cv with the batch-optimal alpha."""
    stats = TokenStats(*(t.detach() for t in (stats.logp, stats.logq, stats.kl, stats.entropy)))
    values = {name: kl_values(stats, mask, name) for name in VALUE_ESTIMATORS}
    values["cv_opt"] = kl_values(stats, mask, "cv", alpha="optimal")
    return values


def kl_to_go(kl: Tensor) -> Tensor:
    """[B, T] -> [B, T]: the KL still to come after each position, sum_{t > s} KL_t."""
    return kl.flip(-1).cumsum(-1).flip(-1) - kl


def kl_surrogate(stats: TokenStats, mask: Tensor, estimator: str, *, baseline: Tensor | None = None) -> Tensor:
    """Per-sample surrogate [B] whose gradient, averaged over y ~ p, is grad KL(p || q).

    mc: sum_s logp_s * [sum_t d_t - b]                    (score function; E[grad f] = 0 dropped)
    rb: sum_t KL_t + sum_s logp_s * [sum_{t>s} KL_t - b]  (pathwise + causal score function)

    `baseline` ([B], or [B, T] for a per-position baseline) must not depend on the sample it is
    subtracted from, e.g. the mean over the other samples of the same prompt; it keeps the
    estimate unbiased and lowers its variance.
    """
    check_estimator(estimator, GRADIENT_ESTIMATORS)
    if estimator == "mc":
        weight = (stats.logp - stats.logq).detach().sum(-1, keepdim=True)  # [B, 1]
    else:
        weight = kl_to_go(stats.kl.detach())  # [B, T]
    if baseline is not None:
        b = baseline.detach()
        weight = weight - (b.unsqueeze(-1) if b.dim() == 1 else b)
    score = (stats.logp * weight * mask).sum(-1)
    if estimator == "mc":
        return score
    return stats.kl.sum(-1) + score


def sequence_kl(
    policy_logits: Tensor,
    ref_logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    estimator: str,
    *,
    alpha: float | str = 1.0,
    chunk_rows: int | None = None,
) -> Tensor:
    """Estimate KL(p || q) for each sampled response: Tensor[B].

    Args:
        policy_logits: [B, T, V]; position t holds the next-token logits that produced tokens[:, t].
        ref_logits: [B, T, V] reference logits at the same positions.
        tokens: [B, T] long, the sampled response.
        mask: [B, T] bool, True up to and including the EOS that ended the response.
        estimator: one of "mc", "k2", "k3", "cv", "rb".
        alpha: control-variate coefficient for "cv": a number or "optimal".
        chunk_rows: rows of [B*T, V] processed at once by the fused op.
    """
    check_estimator(estimator)
    stats = masked_token_stats(
        policy_logits, ref_logits, tokens, mask, kl_grad=estimator == "rb", chunk_rows=chunk_rows
    )
    return kl_values(stats, mask, estimator, alpha=alpha)


def kl_grad_surrogate(
    policy_logits: Tensor,
    ref_logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    estimator: str,
    *,
    baseline: Tensor | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """Per-sample surrogates [B] whose autograd gradient is an unbiased estimate of grad KL.

    Differentiate `kl_grad_surrogate(...).mean()` w.r.t. the parameters that produced
    `policy_logits`. The forward value is not the KL. Arguments as in `sequence_kl`;
    `estimator` is "mc" or "rb" (causal KL-to-go form, docs/estimators.md §4).
    """
    check_estimator(estimator, GRADIENT_ESTIMATORS)
    stats = masked_token_stats(
        policy_logits, ref_logits, tokens, mask, kl_grad=estimator == "rb", chunk_rows=chunk_rows
    )
    return kl_surrogate(stats, mask, estimator, baseline=baseline)
