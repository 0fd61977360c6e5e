"""The optimizer: AdamW over the policy's trainable weights and its learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
from torch import nn

from .options import LR_DECAYS, LrDecay, Optimization


def lr_lambda(warmup_steps: int, total_steps: int | None, decay: LrDecay) -> Callable[[int], float]:
    """Linear warmup over `warmup_steps`, then constant, or linear/cosine decay to 0 at `total_steps`.

    The values were checked where they were set (options.Optimization); only the number of steps,
    known once the trainer is, is checked here.
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {decay!r}")
    if decay != "constant" and not total_steps:
        raise ValueError(f"lr_decay={decay!r} needs a finite number of steps: set trainer.max_steps or max_epochs")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def adamw(params: list[torch.Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per parameter where torch has one (CPU and CUDA): the for-loop
    and foreach versions allocate temporaries of the weights' size (two per weight, or one of all
    weights at once), which at a 150k vocabulary made the update the peak of a fused-head step."""
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def optimizer_and_schedule(policy: nn.Module, settings: Optimization, total_steps: int | None) -> dict:
    """Lightning's `configure_optimizers` answer: AdamW on the policy's trainable weights (not the
    reference's, which `module.parameters()` would include), its schedule stepped per update."""
    optimizer = adamw([p for p in policy.parameters() if p.requires_grad], settings.lr, settings.weight_decay)
    schedule = lr_lambda(settings.warmup_steps, total_steps, settings.lr_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def planned_updates(trainer: L.Trainer, per_batch: int) -> int | None:
    """Optimizer steps the fit will take: Lightning's estimate of batches, capped by max_steps
    (which counts optimizer steps); None for an endless fit."""
    batches, max_steps = trainer.estimated_stepping_batches, trainer.max_steps
    total = int(batches) * per_batch if batches != float("inf") else None
    return min(total, max_steps) if total is not None and max_steps != -1 else total


def clip_gradient_norm(
    module: L.LightningModule, optimizer: torch.optim.Optimizer, max_norm: float, sharded: bool
) -> None:
    """Clip the gradients' global norm to `max_norm` (updates.gradient_clip_val) before a step."""
    if sharded:  # sharded gradients: only the root FSDP module knows the global norm
        module.trainer.strategy.model.clip_grad_norm_(max_norm)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
