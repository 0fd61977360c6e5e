"""One sampled batch -> `ppo_epochs` x `minibatches` optimizer steps, in one code path.

    statistics at the sampling weights   with one update per batch, that update's own forward
                                         (its pieces joined); with several, one no-grad pass
                                         first, which also gives p_old for the importance ratios
    each update                          `micro_batches` pieces of whole prompt groups, each
                                         forward + backward weighed by its share of the samples
                                         (under DDP only the last piece all-reduces), then
                                         gradient clipping and one optimizer and schedule step

The module steps its optimizer itself (manual optimization), so "step" means one optimizer
step everywhere: schedules, logging, checkpoints and `trainer.max_steps`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from ..kl.objective import StepOutput
from .options import Updates
from .rollout import Rollout


@dataclass
class BatchUpdate:
    sampled: StepOutput  # statistics and estimates at the weights that sampled the batch
    pieces: list[StepOutput]  # every piece of every update, in order, each with its loss


class Updater:
    """Runs the updates of `settings` on a rollout through the module's `model_step`."""

    def __init__(self, module: L.LightningModule, settings: Updates):
        self.module, self.settings = module, settings

    def __call__(self, rollout: Rollout) -> BatchUpdate:
        mask, k = rollout.samples.response_mask, rollout.group_size
        sampled = None
        if self.settings.per_batch > 1:
            # Statistics of the policy that sampled, and its log-probs for the importance ratios.
            with torch.no_grad():
                sampled = self.module.model_step(rollout, with_loss=False)
        old_logp = None if sampled is None else sampled.stats.logp.sum(-1)  # [N]
        pieces = [
            piece for prompts in self.schedule(len(rollout.prompts)) for piece in self.step(rollout, prompts, old_logp)
        ]
        # One update: it ran at the sampling weights, so its pieces are the batch's statistics (rho = 1).
        return BatchUpdate(sampled or StepOutput.joined(pieces, mask, k), pieces)

    def schedule(self, n_prompts: int) -> Iterator[Tensor]:
        """Prompt indices of each update: ppo_epochs passes, each in a new random order of groups."""
        s = self.settings
        for _ in range(s.ppo_epochs):
            order = torch.randperm(n_prompts) if s.minibatches > 1 else torch.arange(n_prompts)
            yield from (part for part in order.tensor_split(s.minibatches) if len(part))

    def step(self, rollout: Rollout, prompts: Tensor, old_logp: Tensor | None) -> list[StepOutput]:
        """One optimizer step on the groups of `prompts`, backward in `micro_batches` pieces."""
        module, optimizer = self.module, self.module.optimizers()
        pieces = [p for p in prompts.tensor_split(self.settings.micro_batches) if len(p)]
        # Under DDP only the last piece's backward all-reduces; the others accumulate locally.
        block_sync = getattr(module.trainer.strategy, "block_backward_sync", contextlib.nullcontext)
        outputs = []
        for i, piece in enumerate(pieces):
            with contextlib.nullcontext() if i == len(pieces) - 1 else block_sync():
                part_old = None if old_logp is None else old_logp[rollout.rows(piece)]
                out = module.model_step(rollout.select(piece), old_logp=part_old)
                # Each piece weighs by its share of samples: the sum is the minibatch's mean loss.
                module.manual_backward(out.loss.loss * (len(piece) / len(prompts)))
            outputs.append(out)
        if self.settings.gradient_clip_val is not None:
            self.clip_gradients(optimizer, self.settings.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.lr_schedulers().step()
        return outputs

    def clip_gradients(self, optimizer, max_norm: float) -> None:
        strategy = self.module.trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            # Sharded gradients: only the root FSDP module knows the global norm.
            strategy.model.clip_grad_norm_(max_norm)
        else:
            self.module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
