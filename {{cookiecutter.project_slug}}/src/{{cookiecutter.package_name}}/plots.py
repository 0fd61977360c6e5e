"""Figures, as pure functions of numbers: no Lightning, no files.

Figures are built with matplotlib's object API (`Figure`), not pyplot, so they work on machines
without a display and never leak into pyplot's global state. Metric names come from
`metrics.py`, the one place that spells them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .metrics import GRAD_VAR_PARTS, grad_var_key, kl_key, reward_key, size_key

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


def _value(h: Mapping[str, float], key: str) -> float:
    x = h.get(key)
    return x if _finite(x) else 0.0


def _labelled(count: int, most: int = 8) -> set[int]:
    """Indices of the points to label: the first, the last and every k-th, at most about `most`."""
    step = max(1, math.ceil(count / most))
    return {0, count - 1, *range(0, count, step)}


def sizes_text(metrics: Mapping[str, float], stage: str = "val") -> str:
    """ "n = 16 prompts x M = 8 samples" from a stage's logged sizes."""
    n, m = metrics.get(size_key(stage, "prompts")), metrics.get(size_key(stage, "samples_per_prompt"))
    return f"n = {n:.0f} prompts x M = {m:.0f} samples" if _finite(n) and _finite(m) else "sizes not logged"


def _last_sizes(history: Sequence[Mapping[str, float]]) -> str:
    return sizes_text(history[-1] if history else {})


def _finish(fig: Figure, ax, xlabel: str, ylabel: str, title: str) -> Figure:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(loc="best", fontsize=8)  # "best" is the corner that hides the fewest points
    fig.tight_layout()
    return fig


def reward_vs_kl(history: Sequence[Mapping[str, float]], estimators: Sequence[str] = ("rb",)) -> Figure:
    """Reward against KL, one point per validation epoch, with standard-error bars over prompts."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot()
    reward = reward_key("val", "mean")
    for name in estimators:
        kl = kl_key("val", name, "mean")
        pts = [h for h in history if _finite(h.get(kl)) and _finite(h.get(reward))]
        if not pts:
            continue
        xs, ys = [h[kl] for h in pts], [h[reward] for h in pts]
        ax.errorbar(
            xs,
            ys,
            xerr=[_value(h, kl_key("val", name, "sem_prompts")) for h in pts],
            yerr=[_value(h, reward_key("val", "sem_prompts")) for h in pts],
            marker="o",
            capsize=3,
            color=COLORS.get(name),
            label=f"KL estimated by {name}",
        )
        for i in sorted(_labelled(len(pts))):
            label = f"epoch {int(pts[i]['epoch'])}" if i == 0 else str(int(pts[i]["epoch"]))
            ax.annotate(label, (xs[i], ys[i]), textcoords="offset points", xytext=(5, -10), fontsize=8)
    return _finish(
        fig,
        ax,
        "KL(policy || reference)  [nats]",
        "reward",
        f"Reward vs KL after each epoch\n({_last_sizes(history)}; labels: epoch; bars: 1 s.e. over prompts)",
    )


def estimator_spread(history: Sequence[Mapping[str, float]], estimators: Sequence[str]) -> Figure:
    """Each estimator's standard deviation over samples of one prompt, per epoch, with error bars."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot()
    for name in estimators:
        var, var_sem = kl_key("val", name, "within_prompt_var"), kl_key("val", name, "within_prompt_var_sem")
        pts = [h for h in history if _finite(h.get(var)) and h[var] >= 0]
        if not pts:
            continue
        sd = [math.sqrt(h[var]) for h in pts]
        # Delta method: se(sqrt W) = se(W) / (2 sqrt W).
        err = [_value(h, var_sem) / (2 * s) if s > 0 else 0.0 for h, s in zip(pts, sd, strict=True)]
        ax.errorbar([h["epoch"] for h in pts], sd, yerr=err, marker="o", capsize=3, color=COLORS.get(name), label=name)
    if ax.has_data():
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(
        fig,
        ax,
        "epoch",
        "sqrt(within-prompt variance)  [nats]",
        "Spread of each KL estimator over the samples of a prompt\n"
        f"({_last_sizes(history)}; bars: 1 s.e. over prompts)",
    )


GRAD_VAR_COLORS = {
    "kl_mc": "tab:orange",
    "kl_rb": "tab:blue",
    "reward": "tab:green",
    "total_mc": "tab:red",
    "total_rb": "tab:purple",
}


def gradient_variance(history: Sequence[Mapping[str, float]]) -> Figure:
    """Left: each part's within-prompt gradient variance per epoch; right: the MC/RB ratio of the
    KL part and the KL part's share of each total. Bars: 1 s.e. over prompts."""
    fig = Figure(figsize=(2 * FIGSIZE[0], FIGSIZE[1]), dpi=DPI)
    parts, ratios = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    series = [(parts, name, GRAD_VAR_COLORS[name]) for name in GRAD_VAR_PARTS]
    series += [(ratios, "kl_mc_over_kl_rb", "black"), (ratios, "kl_share_mc", "tab:orange")]
    series += [(ratios, "kl_share_rb", "tab:blue")]
    for ax, name, color in series:
        key = grad_var_key("val", name)
        pts = [h for h in history if _finite(h.get(key)) and h[key] > 0]
        if pts:
            sem = [_value(h, f"{key}_sem") for h in pts]
            ax.errorbar(
                [h["epoch"] for h in pts],
                [h[key] for h in pts],
                yerr=sem,
                marker="o",
                capsize=3,
                color=color,
                label=name,
            )
    for ax in (parts, ratios):
        if ax.has_data():
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(
        fig,
        parts,
        "epoch",
        "tr Cov of the per-sample gradient",
        f"Gradient variance per part\n({_last_sizes(history)})",
    )
    return _finish(fig, ratios, "epoch", "ratio", "KL part: MC over RB, and its share of each total")


def precision_vs_samples(report: Mapping, max_factor: int = 64) -> Figure:
    """Standard error of the prompt set's KL against samples per prompt, one line per estimator.

    sem_within(M) = sqrt(W / (n M)): read off how many samples MC needs to match RB's precision.
    """
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot()
    n, m = report["prompts"], report["samples_per_prompt"]
    ratio = report.get("within_prompt_var_ratio_mc_over_rb")
    # Far enough right that the MC line reaches RB's precision.
    reach = max(m * max_factor, 2 * m * ratio if _finite(ratio) else 0)
    grid = [2**i for i in range(math.ceil(math.log2(reach)) + 1)]
    for name, row in report["estimators"].items():
        w = row["within_prompt_var"]
        if not _finite(w) or w <= 0:
            continue
        ax.plot(grid, [math.sqrt(w / (n * k)) for k in grid], color=COLORS.get(name), label=name)
        ax.plot([m], [math.sqrt(w / (n * m))], "o", color=COLORS.get(name))
    rb = report["estimators"].get("rb", {}).get("within_prompt_var")
    if _finite(rb) and rb > 0:
        target = math.sqrt(rb / (n * m))
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"RB at M = {m}")
        if _finite(ratio):
            ax.plot([ratio * m], [target], "x", color=COLORS["mc"], ms=9)
            ax.annotate(
                f"MC needs M = {ratio * m:.0f} for this precision",
                (m, target),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return _finish(
        fig,
        ax,
        "samples per prompt M",
        "standard error of the KL of this prompt set  [nats]",
        f"Precision of each KL estimator ({n} prompts; dots: measured M = {m})",
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
    for p in points:
        label = f"{p[group_key]}, beta={p['beta']}" if p.get("beta") is not None else str(p[group_key])
        ax.annotate(label, (p["kl"], p["reward"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
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


def sweep_pareto(grid_points: Sequence[Mapping]) -> Figure:
    """Grid-point means of a sweep with 95% intervals over seeds in both directions, labelled."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.add_subplot()
    for group in sorted({str(p["estimator"]) for p in grid_points}):
        mine = [p for p in grid_points if str(p["estimator"]) == group]
        ax.errorbar(
            [p["kl_mean"] for p in mine],
            [p["reward_mean"] for p in mine],
            xerr=[_half_width(p["kl_ci95"]) for p in mine] if all(p["kl_ci95"] for p in mine) else None,
            yerr=[_half_width(p["reward_ci95"]) for p in mine] if all(p["reward_ci95"] for p in mine) else None,
            fmt="o",
            capsize=3,
            color=COLORS.get(group),
            label=f"kl_gradient={group}",
        )
    # Nearby grid points are common (that is what a sweep asks about): stagger their labels.
    for i, p in enumerate(sorted(grid_points, key=lambda p: (p["kl_mean"], p["reward_mean"]))):
        offset = (5, 4 - 10 * (i % 3))
        ax.annotate(p["label"], (p["kl_mean"], p["reward_mean"]), textcoords="offset points", xytext=offset, fontsize=7)
    return _finish(
        fig, ax, "final KL(policy || reference)", "final reward", "Sweep: grid-point means, 95% CI over seeds"
    )


def _half_width(ci: Sequence[float]) -> float:
    return (ci[1] - ci[0]) / 2
