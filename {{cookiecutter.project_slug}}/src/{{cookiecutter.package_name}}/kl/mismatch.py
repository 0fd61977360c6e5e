"""How far the distribution that sampled (an inference engine's, mu) is from the policy's (pi).

An engine such as vLLM reports log mu(y_t | y_<t) of each token it drew; the trainer computes
log pi(y_t | y_<t) of the same tokens. Every KL estimator assumes y ~ pi (docs/estimators.md §6.1),
so these numbers say how much that assumption is off (docs/estimators.md §11).
"""

from __future__ import annotations

import torch
from torch import Tensor


def logp_gap(engine_logp: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """Mean |log mu - log pi| over the response tokens (a scalar); inputs [N, T], mask [N, T] bool."""
    if not engine_logp.shape == logp.shape == mask.shape:
        raise ValueError(f"shapes differ: engine_logp {engine_logp.shape}, logp {logp.shape}, mask {mask.shape}")
    gap = (engine_logp.double() - logp.double()).abs().masked_fill(~mask, 0.0)  # [N, T]
    return gap.sum() / mask.sum().clamp(min=1)


def engine_kl(engine_logp: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """An estimate of KL(mu || pi) per sequence [N] from samples y ~ mu (k3 per token, §11):

        sum_t ( r_t - 1 - log r_t ),   r_t = pi(y_t | y_<t) / mu(y_t | y_<t)

    Given the prefix, E_mu[r_t] = 1 (where mu's support holds pi's) and E_mu[-log r_t] is the
    per-position KL(mu || pi), so each term is unbiased for it, and >= 0: a few samples of a tiny
    mismatch do not give a negative KL as sum_t -log r_t can.
    """
    if not engine_logp.shape == logp.shape == mask.shape:
        raise ValueError(f"shapes differ: engine_logp {engine_logp.shape}, logp {logp.shape}, mask {mask.shape}")
    log_r = (logp.double() - engine_logp.double()).masked_fill(~mask, 0.0)  # [N, T]
    return (torch.expm1(log_r) - log_r).sum(-1)  # [N]
