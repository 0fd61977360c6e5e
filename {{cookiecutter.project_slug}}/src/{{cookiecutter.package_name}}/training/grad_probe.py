"""The gradient-variance probe: each prompt's gradient variances at the current weights (docs/estimators.md §10).

At validation (updates.track_grad_variance): the within-group spread of the M validation samples.
In training (updates.grad_variance_every_n_steps): at the training group size k, before the batch's
updates, from the training group and a second group of k samples of the same prompt: the spread,
the variance of the update taken and the variance without baselines (GRAD_VAR_QUANTITIES).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kl.correction import importance_weights
from ..kl.grad_variance import (
    GRAD_VAR_QUANTITIES,
    contrast_generator,
    difference_contrast,
    joined,
    prompt_grad_variance,
    unit_contrasts,
    update_parts,
)
from ..kl.token_stats import TokenStats, masked_token_stats
from ..models.pair import ModelPair
from ..models.sampler import Samples
from .options import Sampling
from .rollout import Rollout


def grad_variance_due(first_step: int, updates_per_batch: int, every: int) -> bool:
    """Whether a batch's optimizer steps [first_step, first_step + updates_per_batch) hold a multiple of `every`."""
    return (first_step + updates_per_batch - 1) // every > (first_step - 1) // every


class GradVarianceProbe:
    """Each prompt's five gradient variances per quantity at the policy's current weights.

    The statistics are recomputed from materialised logits of one prompt's k responses at a time
    (never in place: each contrast backpropagates through the same graph), so the cost is one
    forward and 3 x `contrasts` backward passes of k rows per prompt.
    """

    def __init__(self, pair: ModelPair, beta: float, contrasts: int | None = None, sampling: Sampling | None = None):
        self.pair, self.beta, self.contrasts = pair, beta, contrasts
        self.sampling = sampling or Sampling()  # its engine_correction weighs the parts as the loss does

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.pair.policy.parameters() if p.requires_grad]

    def stats(self, samples: Samples) -> TokenStats:
        policy_logits = self.pair.response_logits(self.pair.policy, samples)
        ref_logits = self.pair.reference_logits(samples)
        return masked_token_stats(policy_logits, ref_logits, samples.response, samples.response_mask, kl_grad=True)

    def parts(self, samples: Samples, rewards: Tensor, k: int | None, stats: TokenStats | None = None):
        """`update_parts` of one prompt's samples, with the weights of sampling.engine_correction."""
        stats = self.stats(samples) if stats is None else stats
        s, mask = self.sampling, samples.response_mask
        weights = importance_weights(
            stats.logp, samples.engine_logp, mask, s.engine_correction, s.engine_correction_cap
        )
        return update_parts(stats, mask, rewards, k, self.beta, weights)

    def __call__(self, rollout: Rollout, step: int) -> Tensor:
        """[n, 5]: one row per prompt of the rollout, columns GRAD_VAR_PARTS."""
        k, params = rollout.group_size, self.trained_parameters()
        count = self.contrasts or k - 1
        rows = []
        # Lightning evaluates in inference mode; indexing the rollout gives ordinary tensors.
        with torch.inference_mode(False), torch.enable_grad():
            for i, prompt in enumerate(rollout.prompts):
                group = rollout.select(torch.tensor([i]))
                parts = self.parts(group.samples, group.rewards, k)
                rows.append(
                    prompt_grad_variance(parts, params, unit_contrasts(k, count, contrast_generator(step, prompt)))
                )
        return torch.stack(rows)

    def at_training_size(self, rollout: Rollout, second: Rollout, step: int) -> dict[str, Tensor]:
        """{quantity: [n, 5]} per GRAD_VAR_QUANTITIES, from two independent groups of k samples per prompt
        (`rollout`'s and `second`'s, drawn at the current weights).

        spread: the mean of the two groups' s2; update: the difference contrast (each group with its
        own leave-one-out baselines); no_baseline: s2 of the 2k samples without baselines (iid).
        One forward of k rows per group, 3 (2r + 1 + r') backward passes per prompt.
        """
        k, params = rollout.group_size, self.trained_parameters()
        spread_count, pooled_count = min(self.contrasts or k - 1, k - 1), min(self.contrasts or 2 * k - 1, 2 * k - 1)
        rows = {quantity: [] for quantity in GRAD_VAR_QUANTITIES}
        with torch.enable_grad():
            for i, prompt in enumerate(rollout.prompts):
                groups = [r.select(torch.tensor([i])) for r in (rollout, second)]
                stats = [self.stats(g.samples) for g in groups]
                with_baselines = [self.parts(g.samples, g.rewards, k, s) for s, g in zip(stats, groups, strict=True)]
                without = [self.parts(g.samples, g.rewards, None, s) for s, g in zip(stats, groups, strict=True)]
                generator = contrast_generator(step, prompt)
                spreads = [
                    prompt_grad_variance(p, params, unit_contrasts(k, spread_count, generator)) for p in with_baselines
                ]
                rows["spread"].append(torch.stack(spreads).mean(0))
                rows["update"].append(prompt_grad_variance(joined(*with_baselines), params, difference_contrast(k)))
                rows["no_baseline"].append(
                    prompt_grad_variance(joined(*without), params, unit_contrasts(2 * k, pooled_count, generator))
                )
        return {quantity: torch.stack(r) for quantity, r in rows.items()}
