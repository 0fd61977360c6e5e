"""Importance weights pi/mu for responses an inference engine drew from mu instead of the policy pi.

Every estimator assumes y ~ pi (docs/estimators.md §6.1). An engine (vLLM) samples from its own
kernels' distribution mu and reports log mu(y_t | y_<t) of each token it drew; with
r_t = pi(y_t | y_<t) / mu(y_t | y_<t), E_mu[h(y) prod_t r_t] = E_pi[h(y)] for any function h of
the whole response, and E_mu[h(y_<t) prod_{s<t} r_s] = E_pi[h(y_<t)] for a function of a prefix
(docs/estimators.md §12). So

    sequence weight   W     = prod_t r_t           for MC, k2, k3, cv and the policy gradient
    prefix weight     W_<t  = prod_{s<t} r_s       for RB's KL_t and each term of its gradient

`tis` truncates every weight at a cap, min(W, cap), as verl's and TRL's truncated importance
sampling do: biased towards the engine's distribution, with bounded variance. Weights carry no
gradient: they correct which samples were drawn, not the policy's dependence on theta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

EngineCorrection = Literal["none", "is", "tis"]
ENGINE_CORRECTIONS = get_args(EngineCorrection)


@dataclass(frozen=True)
class ImportanceWeights:
    """Detached weights pi/mu of responses drawn from mu; `cap` (tis) truncates each weight."""

    log_ratio: Tensor  # [N, T] log pi(y_t | y_<t) - log mu(y_t | y_<t), 0 on padding, float64
    cap: float | None = None

    @classmethod
    def of(cls, logp: Tensor, engine_logp: Tensor, mask: Tensor, cap: float | None = None) -> ImportanceWeights:
        """From the policy's and the engine's log-probs of the sampled tokens, each [N, T]."""
        if not logp.shape == engine_logp.shape == mask.shape:
            raise ValueError(f"shapes differ: logp {logp.shape}, engine_logp {engine_logp.shape}, mask {mask.shape}")
        if cap is not None and not cap > 0:
            raise ValueError(f"the weights' cap must be > 0, got {cap}")
        # float64: a sum of a thousand small log-ratios, exponentiated, loses float32's digits.
        log_ratio = (logp.detach().double() - engine_logp.detach().double()).masked_fill(~mask, 0.0)
        return cls(log_ratio, cap)

    def _weight(self, log_weight: Tensor, dtype: torch.dtype) -> Tensor:
        if self.cap is not None:
            log_weight = log_weight.clamp(max=math.log(self.cap))
        return log_weight.exp().to(dtype)

    def prefix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """[N, T]: W_<t = pi(y_<t) / mu(y_<t), 1 at the first position (truncated for tis)."""
        inclusive = self.log_ratio.cumsum(-1)
        return self._weight(inclusive - self.log_ratio, dtype)

    def through(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """[N, T]: W_<=t = pi(y_<=t) / mu(y_<=t), the prefix weight of the position after t."""
        return self._weight(self.log_ratio.cumsum(-1), dtype)

    def sequence(self, dtype: torch.dtype = torch.float64, log_shift: Tensor | float = 0.0) -> Tensor:
        """[N]: W = pi(y) / mu(y) (truncated for tis); `log_shift` [N] is added to log W first, so
        that log p_old(y) - log p_theta(y) gives the sampling policy's weight p_old(y) / mu(y)."""
        return self._weight(self.log_ratio.sum(-1) + log_shift, dtype)

    @staticmethod
    def cat(parts: list[ImportanceWeights]) -> ImportanceWeights:
        return ImportanceWeights(torch.cat([part.log_ratio for part in parts]), parts[0].cap)


def importance_weights(
    logp: Tensor, engine_logp: Tensor | None, mask: Tensor, correction: str, cap: float | None = None
) -> ImportanceWeights | None:
    """The weights a correction asks for: None for "none", uncapped for "is", capped for "tis"."""
    if correction not in ENGINE_CORRECTIONS:
        raise ValueError(f"unknown engine correction {correction!r}; valid ones are {', '.join(ENGINE_CORRECTIONS)}")
    if correction == "none":
        return None
    if engine_logp is None:
        raise ValueError(
            f"engine correction {correction!r} needs the log-probs of the distribution that sampled, which these "
            "samples do not carry (only an inference engine reports them)"
        )
    return ImportanceWeights.of(logp, engine_logp, mask, cap if correction == "tis" else None)


def relative_to_go(weighted_to_go: Tensor, through: Tensor) -> Tensor:
    """[N, T]: the weighted KL still to come after s per unit of the weight of y_<=s.

    sum_{t>s} W_<t KL_t / W_<=s = sum_{t>s} (prod_{s<u<t} r_u) KL_t, an estimate of the KL to come
    given y_<=s, and what RB's leave-one-out baseline averages (docs/estimators.md §12). Where
    W_<=s underflows to 0 the term it would weigh is 0 too; 0 keeps the others' baseline finite.
    """
    return torch.where(through > 0, weighted_to_go / through.clamp(min=torch.finfo(through.dtype).tiny), 0.0)


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """(sum w)^2 / (N sum w^2) of N weights given by their logs [N]: 1 when all are equal, 1/N when
    one sample carries all the weight. The share of the batch a weighted mean effectively rests on."""
    w = (log_weights.double() - log_weights.double().max()).exp()  # the shift cancels in the ratio
    return w.sum().square() / (len(w) * w.square().sum())
