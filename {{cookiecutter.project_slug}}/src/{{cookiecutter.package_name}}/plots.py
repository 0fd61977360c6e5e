"""Figures, as pure functions of numbers: no Lightning, no files.

Figures are built with matplotlib's object API (`Figure`), not pyplot, so they work on machines
without a display and never leak into pyplot's global state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure

FIGSIZE, DPI = (6.4, 4.8), 100  # PNGs are 640 x 480 pixels
COLORS = {
    "rb": "tab:blue",
    "mc": "tab:orange",
    "k3": "tab:green",
    "k2": "tab:red",
    "cv": "tab:purple",
    "cv_opt": "tab:brown",
}


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _finish(fig: Figure, ax, xlabel: str, ylabel: str, title: str, legend: str = "lower right") -> Figure:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(loc=legend)
    fig.tight_layout()
    return fig


def reward_vs_kl(history: Sequence[Mapping[str, float]], estimators: Sequence[str] = ("rb",)) -> Figure:
    """Reward against KL, one point per validation epoch, with standard-error bars."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot()
    for name in estimators:
        pts = [h for h in history if _finite(h.get(f"val/kl/{name}/mean")) and _finite(h.get("val/reward/mean"))]
        if not pts:
            continue
        xs = [h[f"val/kl/{name}/mean"] for h in pts]
        ys = [h["val/reward/mean"] for h in pts]
        ax.errorbar(
            xs,
            ys,
            xerr=[h.get(f"val/kl/{name}/sem", 0.0) for h in pts],
            yerr=[h.get("val/reward/sem", 0.0) for h in pts],
            marker="o",
            capsize=3,
            color=COLORS.get(name),
            label=f"KL estimated by {name}",
        )
        for h, x, y in zip(pts, xs, ys, strict=True):
            ax.annotate(str(int(h["epoch"])), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    return _finish(
        fig,
        ax,
        "KL(policy || reference)  [nats]",
        "reward",
        "Reward vs KL after each epoch (labels: epoch; bars: 1 s.e.)",
    )


def estimator_variance(history: Sequence[Mapping[str, float]], estimators: Sequence[str]) -> Figure:
    """Each estimator's spread over samples of one prompt (averaged over prompts), per epoch."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot()
    for name in estimators:
        pts = [
            (h["epoch"], h[f"val/kl/{name}/prompt_std"]) for h in history if _finite(h.get(f"val/kl/{name}/prompt_std"))
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=COLORS.get(name), label=name)
    if ax.has_data():
        ax.set_yscale("symlog", linthresh=1e-3)
    return _finish(
        fig,
        ax,
        "epoch",
        "std of the KL estimate over samples of a prompt",
        "Spread of each KL estimator over samples of a prompt",
        legend="upper left",
    )


def pareto(points: Sequence[Mapping], frontier: set[int], group_key: str = "kl_gradient") -> Figure:
    """Final reward vs KL of several runs, the Pareto frontier (low KL, high reward) drawn as a step line."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot()
    for group in sorted({str(p[group_key]) for p in points}):
        mine = [(i, p) for i, p in enumerate(points) if str(p[group_key]) == group]
        color = COLORS.get(group)
        ax.scatter(
            [p["kl"] for _, p in mine],
            [p["reward"] for _, p in mine],
            color=color,
            alpha=0.5,
            label=f"{group_key}={group}",
        )
        on = [p for i, p in mine if i in frontier]
        ax.scatter([p["kl"] for p in on], [p["reward"] for p in on], color=color, edgecolor="black", s=80, zorder=3)
    front = sorted((points[i] for i in frontier), key=lambda p: p["kl"])
    if front:
        ax.step(
            [p["kl"] for p in front],
            [p["reward"] for p in front],
            where="post",
            color="black",
            lw=1,
            label="Pareto frontier",
        )
    return _finish(
        fig,
        ax,
        "final KL(policy || reference)",
        "final reward",
        "Runs on the reward-KL plane (ringed: on the frontier)",
    )
