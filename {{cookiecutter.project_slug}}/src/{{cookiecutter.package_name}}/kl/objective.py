"""The KL-regularised policy-gradient objective as a surrogate loss (docs/estimators.md §5, §8).

For a prompt with k samples y_1..y_k, rewards R_i and KL coefficient beta, the autograd gradient
of the default loss (`kl_placement="loss"`, `advantage="rloo"`, one update per batch) is

    - (1/N) sum_i [ (R_i - b_i) grad log p(y_i) - beta * g_KL(y_i) ],   b_i = mean_{j != i} R_j

where g_KL is the mc or rb KL gradient with a leave-one-out baseline of the other samples' KL
in its score-function part. Both baselines are independent of the sample they are subtracted
from, so the estimate is unbiased for -grad(E[R] - beta KL).

Variants (each an option of `Objective`):

- `kl_placement="reward"`: each reward becomes R_i - beta * kl_i with kl_i a per-sample value
  estimate (`reward_kl_estimator`: mc, k3, cv with alpha = 1, rb) before the baseline. With
  `detach_reward_kl=False` the loss also keeps kl_i's pathwise gradient (y_i fixed), which makes
  every unbiased value estimator give an unbiased gradient: grad E_p[kl(y)] = E[kl grad log p] +
  E[grad kl]. Detached, only mc stays unbiased (E[grad kl] = E[grad log p] = 0 for mc alone).
- `advantage="grpo"`: (R_i - mean_j R_j) / (std_j R_j + eps) over the prompt's group. The std
  scaling weighs each prompt by 1 / std: its expected gradient is not that of E[R] - beta KL.
- Updates off the sampling policy (PPO epochs, minibatches): `old_logp` holds log p_old(y) of
  the sampling policy. Every term is recomputed at the current theta and the whole per-sample
  estimate is multiplied by the sequence-level ratio rho = p_theta(y) / p_old(y), so that
  E_{p_old}[rho g_theta(y)] = E_{p_theta}[g_theta(y)]: unbiased at the current theta.
- `clip_range` eps: the advantage term becomes PPO's -min(rho A, clip(rho, 1 - eps, 1 + eps) A).
  Clipping trades bias for stability once theta has moved; KL terms outside the advantage (the
  loss placement's KL surrogate, the reward placement's pathwise term) keep the plain ratio, so
  they stay unbiased.
- Samples from an inference engine's mu instead of p (`weights`, docs/estimators.md §12): the
  policy gradient and the reward placement's terms take the sequence weight p_old(y) / mu(y)
  (times rho, which takes it on to p_theta(y) / mu(y)); the loss placement's KL surrogate takes
  the weights p_theta / mu at the current theta (rb: one per prefix) in place of rho.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from .correction import ImportanceWeights
from .estimators import (
    GRADIENT_ESTIMATORS,
    check_estimator,
    kl_surrogate,
    kl_values,
    leave_one_out_mean,
)
from .token_stats import TokenStats

GradientEstimator = Literal["rb", "mc"]
KLPlacement = Literal["loss", "reward"]
RewardKLEstimator = Literal["mc", "k3", "cv", "rb"]
Advantage = Literal["rloo", "grpo"]
KL_PLACEMENTS, REWARD_KL_ESTIMATORS, ADVANTAGES = (
    get_args(KLPlacement),
    get_args(RewardKLEstimator),
    get_args(Advantage),
)
GRPO_EPS = 1e-4  # as TRL's GRPO: a group of equal rewards gets advantage 0, not 0/0


def group_advantage(values: Tensor, k: int, kind: str = "rloo") -> Tensor:
    """[N] per-sample (shaped) rewards -> advantages, each prompt's k samples adjacent."""
    if kind == "rloo":
        return values - leave_one_out_mean(values, k)
    if kind != "grpo":
        raise ValueError(f"unknown advantage {kind!r}; valid names are {', '.join(ADVANTAGES)}")
    grouped = values.reshape(-1, k)
    normalised = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + GRPO_EPS)
    return normalised.reshape(values.shape)


@dataclass(frozen=True)
class Objective:
    """How the loss combines reward and KL; the defaults are on-policy RLOO with the KL in the loss.

    Args:
        beta: KL coefficient.
        kl_gradient: estimator of grad KL when kl_placement is "loss": "rb" (Rao-Blackwellized) or
            "mc" (score function).
        kl_placement: "loss" (the KL gradient estimator beside the reward term) or "reward"
            (R - beta * kl per sample before the baseline, as TRL and the paper's code).
        reward_kl_estimator: kl in the reward: "mc", "k3", "cv" (alpha = 1) or "rb".
        detach_reward_kl: drop kl's own (pathwise) gradient; then only "mc" stays unbiased.
        advantage: "rloo" (leave-one-out baseline) or "grpo" (group mean and std; the std scaling
            changes the objective).
        clip_range: PPO clipping of the sequence ratio in the advantage term (None: no clipping).
    """

    beta: float = 0.05
    kl_gradient: GradientEstimator = "rb"
    kl_placement: KLPlacement = "loss"
    reward_kl_estimator: RewardKLEstimator = "rb"
    detach_reward_kl: bool = False
    advantage: Advantage = "rloo"
    clip_range: float | None = None

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        check_estimator(self.kl_gradient, GRADIENT_ESTIMATORS)
        if self.kl_placement not in KL_PLACEMENTS:
            raise ValueError(f"kl_placement must be one of {', '.join(KL_PLACEMENTS)}, got {self.kl_placement!r}")
        check_estimator(self.reward_kl_estimator, REWARD_KL_ESTIMATORS)
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {', '.join(ADVANTAGES)}, got {self.advantage!r}")
        if self.clip_range is not None and not self.clip_range > 0:
            raise ValueError(f"clip_range must be > 0 (or None for no clipping), got {self.clip_range}")

    @property
    def needs_kl_grad(self) -> bool:
        """Whether the per-token KL must be differentiable (the rb pathwise term is in the loss)."""
        if self.kl_placement == "loss":
            return self.kl_gradient == "rb"
        return self.reward_kl_estimator == "rb" and not self.detach_reward_kl


@dataclass
class LossParts:
    loss: Tensor  # scalar to backpropagate: per_sample.mean()
    per_sample: Tensor  # [N] each sample's term (an exact-expectation test weighs these)
    policy_gradient: Tensor  # scalar, the advantage part of the loss (detached)
    advantage: Tensor  # [N] detached
    clip_fraction: Tensor  # scalar, share of samples whose advantage term is clipped


def rloo_kl_loss(
    stats: TokenStats,
    mask: Tensor,
    rewards: Tensor,
    k: int,
    objective: Objective,
    old_logp: Tensor | None = None,
    weights: ImportanceWeights | None = None,
) -> LossParts:
    """Surrogate loss for N = prompts * k samples (adjacent per prompt), stats at the current theta.

    `old_logp` [N]: log-probability of each response under the policy that sampled it; None when
    the weights have not changed since sampling (then rho = 1 and its gradient is grad log p).
    `weights`: the responses were drawn from an engine's mu, with these weights p_theta / mu at
    the current theta (correction.py); None: drawn from the policy itself.
    """
    o = objective
    seq_logp = stats.logp.sum(-1)  # [N]
    reference = seq_logp.detach() if old_logp is None else old_logp.detach()
    ratio = torch.exp(seq_logp - reference)  # [N], 1 on-policy, with gradient rho * grad log p
    weight = ratio.detach()
    # p_old(y) / mu(y): what takes the sampling engine's draws to the policy that sampled.
    engine_weight = None if weights is None else weights.sequence(weight.dtype, reference - seq_logp.detach())

    if o.kl_placement == "loss":
        advantage = group_advantage(rewards, k, o.advantage).detach()
        # Baseline: the other samples' weight (for rb per position: their KL still to come).
        kl_term = kl_surrogate(stats, mask, o.kl_gradient, group_size=k, weights=weights)  # [N]
        # Weighted, the surrogate already averages to the gradient at the current theta.
        kl_weight = weight if weights is None else torch.ones_like(weight)
    else:
        kl = kl_values(stats, mask, o.reward_kl_estimator)  # [N], differentiable with y fixed
        advantage = group_advantage(rewards - o.beta * kl.detach(), k, o.advantage).detach()
        kl_term = torch.zeros_like(kl) if o.detach_reward_kl else kl  # the pathwise part
        kl_weight = weight if engine_weight is None else weight * engine_weight

    policy_gradient = -ratio * advantage
    clipped = torch.zeros_like(weight, dtype=torch.bool)
    if o.clip_range is not None:
        low, high = 1 - o.clip_range, 1 + o.clip_range
        policy_gradient = torch.maximum(policy_gradient, -ratio.clamp(low, high) * advantage)
        clipped = ((weight > high) & (advantage > 0)) | ((weight < low) & (advantage < 0))
    if engine_weight is not None:
        policy_gradient = engine_weight * policy_gradient
    kl_part = o.beta * kl_weight * kl_term
    per_sample = policy_gradient + kl_part
    return LossParts(
        loss=per_sample.mean(),
        per_sample=per_sample,
        policy_gradient=policy_gradient.detach().mean(),
        advantage=advantage,
        clip_fraction=clipped.float().mean(),
    )
