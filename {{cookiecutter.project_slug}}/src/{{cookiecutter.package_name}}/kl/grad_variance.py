"""Variances of the per-sample gradient estimates of one update, per part (docs/estimators.md §10).

For the k samples y_1..y_k of one prompt, g_j is sample j's term of the on-policy RLOO update
(objective.py), split into the parts

    reward   -(R_j - b_j) grad log p(y_j)                 b_j: leave-one-out mean of the rewards
    kl_mc    beta * grad of the mc KL surrogate of y_j     (leave-one-out baseline)
    kl_rb    beta * grad of the rb KL surrogate of y_j     (leave-one-out baseline, per position)
    total_mc reward + kl_mc                               total_rb  reward + kl_rb

Three quantities, each per sample (GRAD_VAR_QUANTITIES):

    spread       tr Var(g_j) - tr Cov(g_j, g_l)   the within-group s2 = sum_j ||g_j - g_bar||^2 / (k - 1)
    update       tr Var(g_j) + (k - 1) tr Cov     = k tr Var(G), G = g_bar the update actually taken;
                                                  from two independent groups: E ||G1 - G2||^2 / 2
    no_baseline  tr Var(g_j) without baselines    the paper's per-sample variance (b_j = 0)

No per-sample gradient is formed: for a unit vector c, h = grad sum_j c_j loss_j = sum_j c_j g_j is
one backward pass. With c uniform on the unit sphere of {c : sum c = 0}, E ||h||^2 = s2; with
c = (+1/k on group 1, -1/k on group 2) sqrt(k / 2), E ||h||^2 = k tr Var(G).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .correction import ImportanceWeights
from .estimators import kl_surrogate, leave_one_out_mean
from .token_stats import TokenStats

# What is measured (see above), the three parts differentiated, and the five reported with the totals.
GRAD_VAR_QUANTITIES = ("spread", "update", "no_baseline")
GRAD_VAR_PARTS = ("kl_mc", "kl_rb", "reward", "total_mc", "total_rb")
GRADIENT_PARTS = ("reward", "kl_mc", "kl_rb")
_TOTALS = {"total_mc": ("reward", "kl_mc"), "total_rb": ("reward", "kl_rb")}


def update_parts(
    stats: TokenStats,
    mask: Tensor,
    rewards: Tensor,
    k: int | None,
    beta: float,
    weights: ImportanceWeights | None = None,
) -> dict[str, Tensor]:
    """Per-sample surrogates [N] of each part of the on-policy update (rho = 1), k samples per prompt.

    reward + kl_rb (or kl_mc) is `rloo_kl_loss(...).per_sample` of the default objective with that
    KL gradient, term for term; the KL parts are measured for both gradients on the same samples.
    k None: no baselines (-R_j log p(y_j) and the bare KL surrogates), the paper's estimators.
    `weights`: samples from an engine's mu, weighted as the loss weighs them (docs/estimators.md §12).
    """
    seq_logp = stats.logp.sum(-1)  # [N]
    advantage = rewards if k is None else rewards - leave_one_out_mean(rewards, k)
    if weights is not None:
        advantage = weights.sequence(seq_logp.dtype) * advantage
    return {
        "reward": -advantage.detach() * seq_logp,
        "kl_mc": beta * kl_surrogate(stats, mask, "mc", group_size=k, weights=weights),
        "kl_rb": beta * kl_surrogate(stats, mask, "rb", group_size=k, weights=weights),
    }


def joined(*groups: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Several groups' per-sample surrogates of one prompt as one, in order (each keeps its own baselines)."""
    return {name: torch.cat([group[name] for group in groups]) for name in GRADIENT_PARTS}


def difference_contrast(k: int) -> Tensor:
    """[1, 2k]: (+1/k on group 1, -1/k on group 2) sqrt(k / 2), a unit vector whose h = sqrt(k/2) (G1 - G2)
    has E ||h||^2 = k tr Var(G) for independent groups 1 and 2 of the same prompt."""
    sign = torch.cat([torch.ones(k), -torch.ones(k)]).double()
    return (sign / k * (k / 2) ** 0.5).unsqueeze(0)


def unit_contrasts(k: int, count: int, generator: torch.Generator) -> Tensor:
    """[count, k] orthonormal rows, each summing to 0, the set uniformly rotated in that subspace.

    By rotation invariance each row is uniform on the unit sphere of {c : sum c = 0}, so
    E[c c^T] = (I - 11^T / k) / (k - 1); `count` = k - 1 rows are a basis of it.
    """
    if not 1 <= count <= k - 1:
        raise ValueError(f"between 1 and k - 1 = {k - 1} contrasts per prompt, got {count}")
    z = torch.randn(k, count, generator=generator, dtype=torch.float64)
    basis, _ = torch.linalg.qr(z - z.mean(0, keepdim=True))  # [k, count], columns in the centred subspace
    return basis.T


def prompt_grad_variance(parts: Mapping[str, Tensor], params: Sequence[Tensor], contrasts: Tensor) -> Tensor:
    """[5] estimates of E ||h||^2 for GRAD_VAR_PARTS from one prompt's per-sample surrogates [m] each
    and contrasts [r, m] (unit rows; their mean over the rows): s2 for unit_contrasts, k tr Var(G) for
    difference_contrast. One backward pass per part and contrast; only three gradients are held.
    """
    gram = torch.zeros(len(GRADIENT_PARTS), len(GRADIENT_PARTS), dtype=torch.float64)
    for c in contrasts:
        grads = [_flat_gradient((c.to(parts[name].dtype) * parts[name]).sum(), params) for name in GRADIENT_PARTS]
        stacked = torch.stack(grads).double()  # [3, P]
        gram += (stacked @ stacked.T).cpu()
    gram /= len(contrasts)  # E ||h_a||^2 and E h_a . h_b, averaged over the contrasts
    index = {name: i for i, name in enumerate(GRADIENT_PARTS)}

    def norm_of(names: Sequence[str]) -> Tensor:
        rows = [index[name] for name in names]
        return gram[rows][:, rows].sum()  # ||sum of the parts' h||^2

    return torch.stack([norm_of(_TOTALS.get(name, (name,))) for name in GRAD_VAR_PARTS])


def _flat_gradient(surrogate: Tensor, params: Sequence[Tensor]) -> Tensor:
    grads = torch.autograd.grad(surrogate, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [torch.zeros_like(p).flatten() if g is None else g.flatten() for p, g in zip(params, grads, strict=True)]
    )


def contrast_generator(step: int, prompt: str) -> torch.Generator:
    """Seeded by the step and the prompt's text: a prompt gets the same contrasts on any DDP rank."""
    return torch.Generator().manual_seed(zlib.crc32(f"{step}\n{prompt}".encode()))
