"""The KL-regularised RLOO objective as a surrogate loss (docs/estimators.md §5).

For a prompt with k samples y_1..y_k, rewards R_i and KL coefficient beta, the autograd gradient
of the loss is the estimate

    - (1/N) sum_i [ (R_i - b_i) grad log p(y_i) - beta * g_KL(y_i) ],   b_i = mean_{j != i} R_j

where g_KL is the mc or rb KL gradient with a leave-one-out baseline of the other samples' KL
in its score-function part. Both baselines are independent of the sample they are subtracted
from, so the estimate stays unbiased.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .estimators import GRADIENT_ESTIMATORS, check_estimator, kl_surrogate, kl_to_go
from .token_stats import TokenStats


def leave_one_out_mean(values: Tensor, k: int) -> Tensor:
    """[N, ...] grouped as N/k prompts with k adjacent samples -> mean over the other k-1 samples."""
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 samples per prompt, got {k}")
    if values.shape[0] % k:
        raise ValueError(f"{values.shape[0]} samples do not split into groups of {k}")
    grouped = values.reshape(-1, k, *values.shape[1:])
    return ((grouped.sum(1, keepdim=True) - grouped) / (k - 1)).reshape(values.shape)


@dataclass
class LossParts:
    loss: Tensor  # scalar to backpropagate
    policy_gradient: Tensor  # scalar, the reward part of the loss
    kl_penalty: Tensor  # scalar, beta times the KL surrogate
    advantage: Tensor  # [N] R_i - b_i


def rloo_kl_loss(stats: TokenStats, mask: Tensor, rewards: Tensor, k: int, beta: float, kl_gradient: str) -> LossParts:
    """Surrogate loss for one batch of N = prompts * k samples (adjacent per prompt)."""
    check_estimator(kl_gradient, GRADIENT_ESTIMATORS)
    advantage = rewards - leave_one_out_mean(rewards, k)  # [N]
    seq_logp = stats.logp.sum(-1)  # [N]
    if kl_gradient == "rb":
        # Per position: the other samples' KL still to come at the same position.
        kl_baseline = leave_one_out_mean(kl_to_go(stats.kl.detach()), k)  # [N, T]
    else:
        kl_baseline = leave_one_out_mean((stats.logp - stats.logq).detach().sum(-1), k)  # [N]
    kl_part = kl_surrogate(stats, mask, kl_gradient, baseline=kl_baseline)  # [N]
    policy_gradient = -(advantage.detach() * seq_logp).mean()
    kl_penalty = beta * kl_part.mean()
    return LossParts(policy_gradient + kl_penalty, policy_gradient.detach(), kl_penalty.detach(), advantage)
