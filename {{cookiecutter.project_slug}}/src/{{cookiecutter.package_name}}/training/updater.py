"""What each optimizer step of one sampled batch trains on: `ppo_epochs` x `minibatches` steps.

    minibatches    each pass over the batch, in a new random order of whole prompt groups
    micro_batches  each minibatch's forward and backward in pieces of whole prompt groups, each
                   weighed by its share of the samples (the sum is the minibatch's mean loss)

The module runs the loop (`RBKLModule.update`); this file holds no model and no optimizer. "Step"
means one optimizer step everywhere: schedules, logging, checkpoints and `trainer.max_steps`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .options import Updates

if TYPE_CHECKING:
    from .module import StepOutput


@dataclass
class BatchUpdate:
    sampled: StepOutput  # statistics and estimates at the weights that sampled the batch
    pieces: list[StepOutput]  # every piece of every update, in order, each with its loss


def minibatches(n_prompts: int, settings: Updates) -> Iterator[Tensor]:
    """Prompt indices of each update: ppo_epochs passes, each in a new random order of groups."""
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(n_prompts) if settings.minibatches > 1 else torch.arange(n_prompts)
        yield from (part for part in order.tensor_split(settings.minibatches) if len(part))


def micro_batches(prompts: Tensor, settings: Updates) -> list[tuple[Tensor, float]]:
    """The pieces of one minibatch and the weight of each piece's mean loss (its share of samples)."""
    pieces = [p for p in prompts.tensor_split(settings.micro_batches) if len(p)]
    return [(piece, len(piece) / len(prompts)) for piece in pieces]
