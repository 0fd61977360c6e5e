"""Learning-rate schedules as multipliers of the base rate, for torch's LambdaLR."""

from __future__ import annotations

import math
from collections.abc import Callable

from .options import LR_DECAYS, LrDecay


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
