"""The paper's mathematics in pure torch: another trainer (TRL, a plain loop) can import it without
Lightning or transformers (docs/estimators.md holds the derivations, cited here by section).

    token_stats     per-token log-ratios and exact per-position KLs from two sets of logits (§3)
    estimators      the value estimators mc, k2, k3, cv, rb and the KL gradient surrogates (§4-5)
    fused_head      the same token statistics from hidden states and LM-head weights, no [B, T, V] kept
    objective       the KL-regularised RLOO loss and its leave-one-out baselines
    grad_variance   the per-sample gradient's spread, update variance and no-baseline variance, per part (§10)
    mismatch        how far an inference engine's sampling distribution is from the policy's (§11)
    correction      importance weights pi/mu that take an engine's samples back to the policy (§12)
"""

from .estimators import GRADIENT_ESTIMATORS, VALUE_ESTIMATORS, kl_grad_surrogate, sequence_kl
from .fused_head import fused_token_stats
from .objective import LossParts, Objective, rloo_kl_loss
from .token_stats import TokenStats, token_stats

__all__ = [
    "GRADIENT_ESTIMATORS",
    "VALUE_ESTIMATORS",
    "LossParts",
    "Objective",
    "TokenStats",
    "fused_token_stats",
    "kl_grad_surrogate",
    "rloo_kl_loss",
    "sequence_kl",
    "token_stats",
]
