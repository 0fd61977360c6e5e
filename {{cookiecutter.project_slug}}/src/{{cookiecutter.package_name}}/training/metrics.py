"""Statistics of the estimator study, grouped by prompt and exact across DDP ranks.

The paper's quantity is the spread of an estimator over samples of ONE prompt. A batch holds n
prompts with M_i samples each, values f_ij (docs/estimators.md §7):

    m_i  = mean_j f_ij                        s2_i = sum_j (f_ij - m_i)^2 / (M_i - 1)
    mean = mean_i m_i                         the estimate, unweighted over prompts
    within_prompt_var = mean_i s2_i           unbiased for E_x Var[f | x]
    sem_prompts = sd_i(m_i) / sqrt(n)         SE over a population of prompts
    sem_within  = sqrt(sum_i s2_i / M_i) / n  SE for this prompt set (fixed prompts)

Pooling all n*M values into one variance would mix the spread of the true KL across prompts
into the estimator's variance. The state is one float64 vector per metric; the prompt means are
merged with Chan et al.'s parallel formula (as torchmetrics' PearsonCorrCoef does), because sums
of squares in float32 lose the variance once the mean is large. A prompt's samples never span
ranks, so every per-prompt quantity is complete on the rank that saw it.

This file also owns the names under which the statistics are logged: plots, callbacks and
compare_runs build and parse them with the functions below, never by spelling them out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from ..kl.grad_variance import GRAD_VAR_PARTS, GRAD_VAR_QUANTITIES

# Statistics logged for every KL estimator and stage.
KL_STATS = ("mean", "within_prompt_var", "within_prompt_var_sem", "sem_prompts", "sem_within", "neg_frac")
STAGES = ("train", "val", "test")
# Gradient variances per prompt (grad_variance.py), in the column order of GradVarianceStats.
# The cross terms total - reward - kl = 2 tr Cov(reward part, KL part), as weights on those columns.
CROSS_TERMS = {
    "cross_mc": {"total_mc": 1.0, "reward": -1.0, "kl_mc": -1.0},
    "cross_rb": {"total_rb": 1.0, "reward": -1.0, "kl_rb": -1.0},
}
# Ratios of mean gradient variances: MC's KL part over RB's, the KL part's share of each total,
# and the cross term's share of each total.
RATIOS = {
    "kl_mc_over_kl_rb": ("kl_mc", "kl_rb"),
    # With `update`: what choosing the KL gradient does to the variance of the step, cross terms included.
    "total_mc_over_total_rb": ("total_mc", "total_rb"),
    "kl_share_mc": ("kl_mc", "total_mc"),
    "kl_share_rb": ("kl_rb", "total_rb"),
    "cross_share_mc": ("cross_mc", "total_mc"),
    "cross_share_rb": ("cross_rb", "total_rb"),
}

# State layout: [n, mean of m_i, M2 of m_i, sum s2_i, sum s2_i^2, sum s2_i / M_i, samples, negatives]
_N, _MEAN, _M2, _S2, _S2SQ, _S2_OVER_M, _SAMPLES, _NEG = range(8)


def kl_key(stage: str, estimator: str, stat: str) -> str:
    return f"{stage}/kl/{estimator}/{stat}"


def reward_key(stage: str, stat: str) -> str:
    return f"{stage}/reward/{stat}"


def reward_function_key(stage: str, name: str, stat: str = "mean") -> str:
    """A statistic of one reward of a list (its name: the function's, or the class's)."""
    return reward_key(stage, f"{name}/{stat}")


def ratio_key(stage: str) -> str:
    """Within-prompt variance of MC over RB: how many times more samples MC needs for RB's precision."""
    return f"{stage}/kl/within_prompt_var_ratio/mc_over_rb"


def grad_var_key(stage: str, quantity: str, name: str) -> str:
    """A gradient variance of one of grad_variance.GRAD_VAR_QUANTITIES (spread, update, no_baseline):
    a part (GRAD_VAR_PARTS), a cross term (CROSS_TERMS) or a ratio (RATIOS); with `_sem` appended,
    its standard error over prompts."""
    return f"{stage}/grad_var/{quantity}/{name}"


def grad_var_columns() -> list[tuple[str, str]]:
    """The (stage, quantity) pairs that can be logged: validation's spread, training's three."""
    return [("val", "spread"), *(("train", quantity) for quantity in GRAD_VAR_QUANTITIES)]


def size_key(stage: str, what: str) -> str:
    """`prompts` (n) or `samples_per_prompt` (M) behind a stage's statistics."""
    return f"{stage}/{what}"


def _merge_two(a: Tensor, b: Tensor) -> Tensor:
    n_a, n_b = a[_N], b[_N]
    n = n_a + n_b
    # No `if n == 0` branch: it would sync the device on every update. Two empty sides give
    # delta * 0 / 1 = 0, i.e. the zero state back.
    n_safe = n.clamp(min=1)
    delta = b[_MEAN] - a[_MEAN]
    merged = a + b
    merged[_MEAN] = a[_MEAN] + delta * n_b / n_safe
    merged[_M2] = a[_M2] + b[_M2] + delta.square() * n_a * n_b / n_safe
    return merged


def merge_states(stacked: Tensor) -> Tensor:
    """Merge the rows of a [k, 8] stack of states into one [8] state (order-free)."""
    if stacked.dim() == 1:
        return stacked
    merged = stacked[0]
    for row in stacked[1:]:
        merged = _merge_two(merged, row)
    return merged


def group_state(values: Tensor, group_sizes: Tensor) -> Tensor:
    """The [8] state of values [N] whose groups (prompts) are adjacent, of the given sizes [n]."""
    x = values.detach().flatten().to(torch.float64)
    sizes = group_sizes.to(device=x.device, dtype=torch.long)
    n = sizes.numel()
    if n == 0:
        return torch.zeros(8, dtype=torch.float64, device=x.device)
    group = torch.repeat_interleave(torch.arange(n, device=x.device), sizes)  # [N]
    count = sizes.to(torch.float64)
    means = torch.zeros(n, dtype=torch.float64, device=x.device).index_add_(0, group, x) / count  # [n]
    s2 = torch.zeros_like(means).index_add_(0, group, (x - means[group]).square()) / (count - 1)  # [n]
    grand = means.mean()
    return torch.stack(
        [
            torch.tensor(float(n), dtype=torch.float64, device=x.device),
            grand,
            (means - grand).square().sum(),
            s2.sum(),
            s2.square().sum(),
            (s2 / count).sum(),
            count.sum(),
            (x < 0).sum().to(torch.float64),
        ]
    )


class PromptGroupedStats(Metric):
    """Mean, within-prompt variance and both standard errors of values grouped by prompt.

    Example:
        >>> m = PromptGroupedStats()
        >>> m.update(torch.tensor([1.0, 3.0, 10.0, 14.0]), 2)  # two prompts, two samples each
        >>> {k: round(v.item(), 4) for k, v in m.compute().items()}["within_prompt_var"]
        5.0
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # One state, so a DDP sync gathers one tensor per rank.
        self.add_state("state", default=torch.zeros(8, dtype=torch.float64), dist_reduce_fx=merge_states)

    def update(self, values: Tensor, group_sizes: int | Sequence[int] | Tensor) -> None:
        """values [N], prompts adjacent; group_sizes: samples per prompt (one number if all equal)."""
        if isinstance(group_sizes, int):
            if group_sizes < 2 or values.numel() % group_sizes:
                raise ValueError(f"{values.numel()} values do not split into groups of {group_sizes} >= 2")
            group_sizes = torch.full((values.numel() // group_sizes,), group_sizes)
        sizes = torch.as_tensor(group_sizes)
        if int(sizes.sum()) != values.numel() or bool((sizes < 2).any()):
            raise ValueError(
                f"group sizes {sizes.tolist()} must each be >= 2 (a variance per prompt) and add up to "
                f"the {values.numel()} values"
            )
        self.state = _merge_two(self.state, group_state(values, sizes).to(self.state.device))

    def compute(self) -> dict[str, Tensor]:
        s = merge_states(self.state)
        n = s[_N]
        nan = torch.full_like(n, float("nan"))
        if n == 0:
            return {key: nan for key in (*KL_STATS, "prompts", "samples")}
        w = s[_S2] / n
        w_var = (s[_S2SQ] - n * w.square()) / (n - 1) if n > 1 else nan  # variance of s2_i across prompts
        sd_means = (s[_M2] / (n - 1)).sqrt() if n > 1 else nan
        return {
            "mean": s[_MEAN],
            "within_prompt_var": w,
            "within_prompt_var_sem": (w_var.clamp(min=0) / n).sqrt(),
            "sem_prompts": sd_means / n.sqrt(),
            "sem_within": s[_S2_OVER_M].sqrt() / n,
            "neg_frac": s[_NEG] / s[_SAMPLES],
            "prompts": n,
            "samples": s[_SAMPLES],
        }


class GradVarianceStats(Metric):
    """Means over prompts of per-prompt gradient variances, and ratios of them, with standard errors.

    Each prompt contributes one row of the five variances of one quantity (grad_variance.py); the
    state is the count, the column sums and the cross-product sums in float64, summed over ranks.
    Plain sums suffice here, unlike for the KL values: a variance estimate's spread over prompts is
    of the order of its mean, not 1e-8 of it. The cross terms (CROSS_TERMS) are linear combinations
    of the column means, the ratios (RATIOS) ratios of such combinations; their standard errors come
    from the covariance of the column means over prompts (the delta method for the ratios).

    Example:
        >>> m = GradVarianceStats()
        >>> m.update(torch.tensor([[2.0, 1.0, 3.0, 4.0, 3.0], [4.0, 1.0, 5.0, 8.0, 5.0]]))
        >>> round(m.compute()["kl_mc_over_kl_rb"].item(), 4)
        3.0
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        width = len(GRAD_VAR_PARTS)
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sums", default=torch.zeros(width, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("products", default=torch.zeros(width, width, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, per_prompt: Tensor) -> None:
        """per_prompt [n, 5]: each prompt's variances, columns in GRAD_VAR_PARTS order."""
        if per_prompt.dim() != 2 or per_prompt.shape[1] != len(GRAD_VAR_PARTS):
            raise ValueError(f"expected [prompts, {len(GRAD_VAR_PARTS)}] variances, got {tuple(per_prompt.shape)}")
        x = per_prompt.detach().to(self.sums.device, torch.float64)
        self.count += x.shape[0]
        self.sums += x.sum(0)
        self.products += x.T @ x

    def compute(self) -> dict[str, Tensor]:
        n = self.count
        mean = self.sums / n
        # Covariance of the per-prompt values, then of their means.
        cov = (
            (self.products - n * torch.outer(mean, mean)) / (n - 1) / n
            if n > 1
            else torch.full_like(self.products, float("nan"))
        )
        # Every logged mean is a weighted sum of the columns' means: a part, or a cross term.
        weights = {name: torch.zeros_like(mean) for name in (*GRAD_VAR_PARTS, *CROSS_TERMS)}
        for i, name in enumerate(GRAD_VAR_PARTS):
            weights[name][i] = 1.0
        for name, terms in CROSS_TERMS.items():
            for part, w in terms.items():
                weights[name][GRAD_VAR_PARTS.index(part)] = w
        out = {}
        for name, w in weights.items():
            out[name], out[f"{name}_sem"] = w @ mean, (w @ cov @ w).clamp(min=0).sqrt()
        for name, (top, bottom) in RATIOS.items():
            u, v = weights[top], weights[bottom]
            ratio = (u @ mean) / (v @ mean)
            # Delta method: Var(A/B) ~ (Var A - 2 R Cov(A, B) + R^2 Var B) / B^2, with A = u.mean, B = v.mean.
            d = u - ratio * v
            out[name], out[f"{name}_sem"] = ratio, ((d @ cov @ d) / (v @ mean).square()).clamp(min=0).sqrt()
        out["prompts"] = n
        return out


class EstimatorStudy(nn.Module):
    """One stage's bookkeeping: every KL estimator and the reward, grouped by prompt."""

    def __init__(self, stage: str, estimators: Sequence[str], grad_variance: Sequence[str] = ()):
        super().__init__()
        self.stage = stage
        # Only the quantities the module measures at this stage (Updates.grad_variance_measured), keyed
        # "<quantity>_stats": a ModuleDict key may not shadow one of its attributes (update).
        self.grad_variance = nn.ModuleDict({f"{quantity}_stats": GradVarianceStats() for quantity in grad_variance})
        # One metric per quantity, never a MetricCollection with compute groups, which would
        # merge these look-alike states and report wrong numbers.
        self.kl = nn.ModuleDict({name: PromptGroupedStats() for name in estimators})
        self.reward = PromptGroupedStats()
        # Each reward of a list: the mean over the responses it applies to (a None is nan, left out,
        # as TRL's nanmean). Made at the first update, where the names are known: alike on every rank.
        self.by_reward = nn.ModuleDict()

    def update(
        self,
        values: Mapping[str, Tensor],
        rewards: Tensor,
        group_size: int,
        by_reward: Mapping[str, Tensor] | None = None,
    ) -> None:
        for name, metric in self.kl.items():
            metric.update(values[name], group_size)
        self.reward.update(rewards, group_size)
        for name, reward_values in (by_reward or {}).items():
            if name not in self.by_reward:
                self.by_reward[name] = MeanMetric(nan_strategy="ignore").to(rewards.device)
            self.by_reward[name].update(reward_values.to(rewards.device))

    def update_grad_variance(self, quantity: str, per_prompt: Tensor) -> None:
        """per_prompt [n, 5]: each prompt's gradient variances of one of GRAD_VAR_QUANTITIES."""
        self.grad_variance[f"{quantity}_stats"].update(per_prompt)

    def compute(self) -> dict[str, Tensor]:
        """Every logged statistic by its key, then reset. A DDP collective: every rank calls it."""
        stage = self.stage
        logged = {}
        for name, metric in self.kl.items():
            stats = metric.compute()
            logged.update({kl_key(stage, name, stat): stats[stat].float() for stat in KL_STATS})
            metric.reset()
        reward = self.reward.compute()
        self.reward.reset()
        logged[reward_key(stage, "mean")] = reward["mean"].float()
        logged[reward_key(stage, "sem_prompts")] = reward["sem_prompts"].float()
        for name, metric in self.by_reward.items():
            logged[reward_function_key(stage, name)] = metric.compute().float()
            metric.reset()
        logged[size_key(stage, "prompts")] = reward["prompts"].float()
        logged[size_key(stage, "samples_per_prompt")] = (reward["samples"] / reward["prompts"]).float()
        if "mc" in self.kl and "rb" in self.kl:
            w_mc, w_rb = (
                logged[kl_key(stage, "mc", "within_prompt_var")],
                logged[kl_key(stage, "rb", "within_prompt_var")],
            )
            logged[ratio_key(stage)] = w_mc / w_rb
        for key, metric in self.grad_variance.items():
            quantity = key.removesuffix("_stats")
            if not metric.update_called:
                continue  # not measured in this logging window (training measures every N steps)
            grad_var = metric.compute()
            metric.reset()
            logged.update(
                {grad_var_key(stage, quantity, name): v.float() for name, v in grad_var.items() if name != "prompts"}
            )
        return logged
