"""The gradient-variance probe: each prompt's within-prompt gradient variances at the current weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kl.grad_variance import contrast_generator, prompt_grad_variance, unit_contrasts, update_parts
from ..kl.token_stats import TokenStats, masked_token_stats
from ..models.pair import ModelPair
from ..models.sampler import Samples
from .rollout import Rollout


class GradVarianceProbe:
    """Each prompt's five within-prompt gradient variances at the policy's current weights.

    The statistics are recomputed from materialised logits of one prompt's k responses at a time
    (never in place: each contrast backpropagates through the same graph), so the cost is one
    forward and 3 x `contrasts` backward passes of k rows per prompt.
    """

    def __init__(self, pair: ModelPair, beta: float, contrasts: int | None = None):
        self.pair, self.beta, self.contrasts = pair, beta, contrasts

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.pair.policy.parameters() if p.requires_grad]

    def stats(self, samples: Samples) -> TokenStats:
        policy_logits = self.pair.response_logits(self.pair.policy, samples)
        ref_logits = self.pair.reference_logits(samples)
        return masked_token_stats(policy_logits, ref_logits, samples.response, samples.response_mask, kl_grad=True)

    def __call__(self, rollout: Rollout, step: int) -> Tensor:
        """[n, 5]: one row per prompt of the rollout, columns GRAD_VAR_PARTS."""
        k, params = rollout.group_size, self.trained_parameters()
        count = self.contrasts or k - 1
        rows = []
        # Lightning evaluates in inference mode; indexing the rollout gives ordinary tensors.
        with torch.inference_mode(False), torch.enable_grad():
            for i, prompt in enumerate(rollout.prompts):
                group = rollout.select(torch.tensor([i]))
                parts = update_parts(
                    self.stats(group.samples), group.samples.response_mask, group.rewards, k, self.beta
                )
                rows.append(
                    prompt_grad_variance(parts, params, unit_contrasts(k, count, contrast_generator(step, prompt)))
                )
        return torch.stack(rows)
