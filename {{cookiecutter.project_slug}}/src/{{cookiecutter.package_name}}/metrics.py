"""Running moments of a stream of values, exact across DDP ranks.

Sum and sum-of-squares in float32 lose the variance once the mean is large (a KL of 1e4 nats
squared is 1e8, beyond float32's 7 digits). Count, mean and M2 = sum (x - mean)^2 are kept in
float64 and merged with Chan et al.'s parallel formula, as torchmetrics' PearsonCorrCoef does:

    n = n_a + n_b,   delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    M2 = M2_a + M2_b + delta^2 * n_a * n_b / n
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def merge_moments(stacked: Tensor) -> Tensor:
    """Merge rows [count, mean, m2, negatives] of a [k, 4] tensor into one [4] row (order-free)."""
    if stacked.dim() == 1:
        return stacked
    merged = stacked[0]
    for row in stacked[1:]:
        merged = _merge_two(merged, row)
    return merged


def _merge_two(a: Tensor, b: Tensor) -> Tensor:
    n_a, n_b = a[0], b[0]
    n = n_a + n_b
    # No `if n == 0` branch: it would sync the device on every update. Two empty sides give
    # delta * 0 / 1 = 0, i.e. the zero state back.
    n_safe = n.clamp(min=1)
    delta = b[1] - a[1]
    mean = a[1] + delta * n_b / n_safe
    m2 = a[2] + b[2] + delta.square() * n_a * n_b / n_safe
    return torch.stack([n, mean, m2, a[3] + b[3]])


def batch_moments(values: Tensor) -> Tensor:
    x = values.detach().flatten().to(torch.float64)
    n = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    if x.numel() == 0:
        return torch.zeros(4, dtype=torch.float64, device=x.device)
    mean = x.mean()
    return torch.stack([n, mean, (x - mean).square().sum(), (x < 0).sum().to(torch.float64)])


class RunningMoments(Metric):
    """Mean, variance, std, standard error and share of negative values of everything updated.

    Example:
        >>> m = RunningMoments()
        >>> m.update(torch.tensor([1.0, 2.0])); m.update(torch.tensor([3.0, -4.0]))
        >>> {k: round(v.item(), 4) for k, v in m.compute().items()}
        {'mean': 0.5, 'var': 9.6667, 'std': 3.1091, 'sem': 1.5546, 'neg_frac': 0.25}
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # One state, [count, mean, m2, negatives], so a DDP sync gathers one tensor per rank.
        self.add_state("moments", default=torch.zeros(4, dtype=torch.float64), dist_reduce_fx=merge_moments)

    def update(self, values: Tensor) -> None:
        self.moments = _merge_two(self.moments, batch_moments(values).to(self.moments.device))

    def compute(self) -> dict[str, Tensor]:
        n, mean, m2, negatives = merge_moments(self.moments)
        var = m2 / (n - 1) if n > 1 else torch.full_like(m2, float("nan"))
        return {
            "mean": mean if n > 0 else torch.full_like(mean, float("nan")),
            "var": var,
            "std": var.sqrt(),
            "sem": (var / n).sqrt(),
            "neg_frac": negatives / n if n > 0 else torch.full_like(n, float("nan")),
        }
