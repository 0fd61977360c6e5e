"""Figures, as pure functions of numbers: no Lightning, no files.

Figures are built with matplotlib's object API (`Figure`) on an Agg canvas, not pyplot, so they
work on machines without a display and never leak into pyplot's global state. Metric names come
from `metrics.py`, the one place that spells them.

Every legend sits below its axes, where it can hide no data; point labels go where they cover
nothing drawn (`labels.place_labels`), or are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..kl.grad_variance import GRAD_VAR_PARTS
from ..training.metrics import grad_var_key, kl_key, reward_key, size_key
from .labels import place_labels

FIGSIZE, DPI = (6.4, 4.8), 100  # PNGs are 640 x 480 pixels
COLORS = {
    "rb": "tab:blue",
    "mc": "tab:orange",
    "k3": "tab:green",
    "k2": "tab:red",
    "cv": "tab:purple",
    "cv_opt": "tab:brown",
}
# Estimators with nearly equal values (k2 and k3, cv and cv_opt) draw coinciding lines: a marker
# shape and a dash pattern of their own keep each one visible under the others.
MARKERS = {"rb": "o", "mc": "s", "k3": "^", "k2": "v", "cv": "D", "cv_opt": "P"}
LINESTYLES = {
    "rb": "-",
    "mc": "--",
    "k3": "-.",
    "k2": ":",
    "cv": (0, (6, 2, 1, 2, 1, 2)),
    "cv_opt": (0, (2, 3)),
}
# What each name means (docs/estimators.md §3), for legends; d is the per-token log-ratio.
ESTIMATOR_NAMES = {
    "mc": "mc: Monte Carlo, sum of d",
    "k2": "k2: sum of d²/2 (biased)",
    "k3": "k3: sum of exp(-d) - 1 + d",
    "cv": "cv: mc + control variate, alpha = 1",
    "cv_opt": "cv_opt: cv with alpha fitted on other prompts",
    "rb": "rb: Rao-Blackwellized, sum of exact per-token KL",
}
LOG_RATIO = "d = log policy(y_t) / reference(y_t)"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _value(h: Mapping[str, float], key: str) -> float:
    x = h.get(key)
    return x if _finite(x) else 0.0


def _labelled(count: int, most: int = 8) -> list[int]:
    """Indices of the points to label, most important first: the first, the last, every k-th."""
    step = max(1, math.ceil(count / most))
    return list(dict.fromkeys([0, count - 1, *range(step, count - 1, step)]))


def _style(name: str) -> dict:
    return {"color": COLORS.get(name), "marker": MARKERS.get(name, "o"), "linestyle": LINESTYLES.get(name, "-")}


def sizes_text(metrics: Mapping[str, float], stage: str = "val") -> str:
    """ "n = 16 prompts x M = 8 samples" from a stage's logged sizes."""
    n, m = metrics.get(size_key(stage, "prompts")), metrics.get(size_key(stage, "samples_per_prompt"))
    return f"n = {n:.0f} prompts x M = {m:.0f} samples" if _finite(n) and _finite(m) else "sizes not logged"


def _last_sizes(history: Sequence[Mapping[str, float]]) -> str:
    return sizes_text(history[-1] if history else {})


def _figure() -> tuple[Figure, Axes]:
    # The Agg canvas from the start: label placement measures text with its renderer.
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig: Figure, ax: Axes, xlabel: str, ylabel: str, title: str, columns: int = 2, note: str = "") -> Figure:
    """Axis labels, title and the legend below the axes; lays the figure out for `place_labels`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside lower center", ncols=columns, fontsize=7, title=note or None, title_fontsize=7)
    fig.draw_without_rendering()  # the layout is final from here: labels are placed in pixels
    return fig


def reward_vs_kl(
    history: Sequence[Mapping[str, float]], estimators: Sequence[str] = ("rb",), reward_name: str = ""
) -> Figure:
    """Reward against KL, one point per validation epoch, with standard-error bars over prompts.

    `reward_name` (the reward's class or configured name) goes on the y axis. Epoch labels go on
    the first estimator's points: the first, the last and every k-th epoch where there is room.
    """
    fig, ax = _figure()
    reward = reward_key("val", "mean")
    series = []
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
            capsize=3,
            label=f"KL estimated by {name}",
            # Hollow after the first: where two estimates coincide (epoch 0) both markers show.
            mfc=None if not series else "none",
            **_style(name),
        )
        series.append((xs, ys, [int(h["epoch"]) for h in pts]))
    _finish(
        fig,
        ax,
        "KL(policy || reference)  [nats]",
        f"reward: {reward_name}" if reward_name else "reward",
        f"Reward vs KL after each epoch\n({_last_sizes(history)}; labels: epoch; bars: 1 s.e. over prompts)",
        columns=max(1, len(series)),
    )
    if series:
        xs, ys, epochs = series[0]
        order = _labelled(len(xs), most=10)
        texts = [f"epoch {epochs[i]}" if i == 0 else str(epochs[i]) for i in order]
        place_labels(ax, [(xs[i], ys[i]) for i in order], texts)
    return fig


def estimator_spread(history: Sequence[Mapping[str, float]], estimators: Sequence[str]) -> Figure:
    """Each estimator's standard deviation over samples of one prompt, per epoch, with error bars
    (each estimator's points a few pixels beside the others', so that equal values stay visible)."""
    fig, ax = _figure()
    epochs, top, smallest = [], 0.0, math.inf
    # Estimators with equal spreads (mc, cv_opt at epoch 0) would hide each other's markers:
    # each is shifted sideways by about 5 pixels from the next, whatever the number of epochs.
    known = [h["epoch"] for h in history]
    dodge = (max(known) - min(known) + 1) * 5 / 540 if known else 0.0
    for index, name in enumerate(estimators):
        var, var_sem = kl_key("val", name, "within_prompt_var"), kl_key("val", name, "within_prompt_var_sem")
        pts = [h for h in history if _finite(h.get(var)) and h[var] >= 0]
        if not pts:
            continue
        sd = [math.sqrt(h[var]) for h in pts]
        # Delta method: se(sqrt W) = se(W) / (2 sqrt W).
        err = [_value(h, var_sem) / (2 * s) if s > 0 else 0.0 for h, s in zip(pts, sd, strict=True)]
        epochs += [h["epoch"] for h in pts]
        top = max(top, *(s + e for s, e in zip(sd, err, strict=True)))
        smallest = min(smallest, *(s for s in sd if s > 0), math.inf)
        label = ESTIMATOR_NAMES.get(name, name)
        shift = (index - (len(estimators) - 1) / 2) * dodge
        xs = [h["epoch"] + shift for h in pts]
        # Unclipped: a spread of 0 sits on the bottom edge, and its marker shows whole.
        ax.errorbar(xs, sd, yerr=err, capsize=3, label=label, markersize=5, clip_on=False, **_style(name))
    if epochs:
        # Whole epochs only, and half an epoch either side: a single epoch gets a range too.
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        # Linear from 0 to the decade below the smallest positive spread, logarithmic above it.
        ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(smallest)) if smallest < math.inf else 1e-3)
        # A spread is >= 0; with every spread 0 (the policy still equals the reference) the
        # axis keeps a readable range instead of a degenerate one around 0.
        ax.set_ylim(0, 2 * top if top > 0 else 1e-2)
        if top == 0:
            ax.text(0.5, 0.6, "every estimator's spread is 0", transform=ax.transAxes, ha="center", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    return _finish(
        fig,
        ax,
        "epoch",
        "sqrt(within-prompt variance)  [nats]",
        "Spread of each KL estimator over the samples of a prompt\n"
        f"({_last_sizes(history)}; bars: 1 s.e. over prompts)",
        note=LOG_RATIO,
    )


GRAD_VAR_COLORS = {
    "kl_mc": "tab:orange",
    "kl_rb": "tab:blue",
    "reward": "tab:green",
    "total_mc": "tab:red",
    "total_rb": "tab:purple",
}


def gradient_variance(history: Sequence[Mapping[str, float]]) -> Figure:
    """Left: each part's within-group gradient spread at validation per epoch; right: the MC/RB ratio of the
    KL part and the KL part's share of each total. Bars: 1 s.e. over prompts."""
    fig = Figure(figsize=(2 * FIGSIZE[0], FIGSIZE[1]), dpi=DPI)
    parts, ratios = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    series = [(parts, name, GRAD_VAR_COLORS[name]) for name in GRAD_VAR_PARTS]
    series += [(ratios, "kl_mc_over_kl_rb", "black"), (ratios, "kl_share_mc", "tab:orange")]
    series += [(ratios, "kl_share_rb", "tab:blue")]
    for ax, name, color in series:
        key = grad_var_key("val", "spread", name)
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
        "within-group spread of the per-sample gradient",
        f"Gradient variance per part\n({_last_sizes(history)})",
    )
    return _finish(fig, ratios, "epoch", "ratio", "KL part: MC over RB, and its share of each total")


# Logged by training/log.py under these names; metrics.py has no builder for them.
LOSS, RESPONSE_LENGTH = "train/loss", "train/response_length"
TRAINING, VALIDATION = "tab:blue", "black"
# Each reward function's own line; blue stays the weighted total's.
FUNCTION_COLORS = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]


def reward_functions(rows: Sequence[Mapping[str, float]]) -> list[str]:
    """Names of the reward functions whose means were logged one by one (`train/reward/<name>/mean`)."""
    prefix, suffix = reward_key("train", ""), "/mean"
    keys = dict.fromkeys(key for row in rows for key in row)
    names = [key[len(prefix) : -len(suffix)] for key in keys if key.startswith(prefix) and key.endswith(suffix)]
    return [name for name in names if name]  # the total, `train/reward/mean`, leaves an empty name


def _steps(ax: Axes, rows: Sequence[Mapping[str, float]], key: str, **style) -> None:
    """One value per logged row that has `key`, against the row's step."""
    pts = [r for r in rows if _finite(r.get(key)) and _finite(r.get("step"))]
    if pts:
        ax.plot([r["step"] for r in pts], [r[key] for r in pts], marker="o", markersize=2, lw=1, **style)


def _validations(ax: Axes, rows: Sequence[Mapping[str, float]], key: str, sem: str) -> None:
    pts = [r for r in rows if _finite(r.get(key)) and _finite(r.get("step"))]
    if pts:
        ax.errorbar(
            [r["step"] for r in pts],
            [r[key] for r in pts],
            yerr=[_value(r, sem) for r in pts],
            fmt="o",
            mfc="none",
            capsize=3,
            color=VALIDATION,
            label="validation: mean over held-out prompts, 1 s.e.",
            zorder=3,
        )


def training_curves(rows: Sequence[Mapping[str, float]], reward_name: str = "") -> Figure:
    """Per-step training curves from the rows of metrics.csv, one panel each: the reward (the
    weighted total, and each reward function's mean where it was logged), the RB KL, the loss and
    the response length, against the optimizer step of each logged batch. Validation means sit on
    the reward and KL panels as markers, at the step of the weights they evaluated.
    """
    fig = Figure(figsize=(2 * FIGSIZE[0], 1.6 * FIGSIZE[1]), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    reward, kl, loss, length = fig.subplots(2, 2, sharex=True).flat
    batch = {"color": TRAINING, "label": "training: mean as logged at each step"}
    _steps(reward, rows, reward_key("train", "mean"), **batch)
    for i, name in enumerate(reward_functions(rows)):
        color = FUNCTION_COLORS[i % len(FUNCTION_COLORS)]
        _steps(
            reward, rows, reward_key("train", f"{name}/mean"), color=color, ls="--", label=f"reward function: {name}"
        )
    _validations(reward, rows, reward_key("val", "mean"), reward_key("val", "sem_prompts"))
    _steps(kl, rows, kl_key("train", "rb", "mean"), **batch)
    _validations(kl, rows, kl_key("val", "rb", "mean"), kl_key("val", "rb", "sem_prompts"))
    _steps(loss, rows, LOSS, **batch)
    _steps(length, rows, RESPONSE_LENGTH, **batch)
    panels = {
        reward: f"reward: {reward_name}" if reward_name else "reward",
        kl: "KL(policy || reference), RB  [nats]",
        loss: "loss",
        length: "response length  [tokens]",
    }
    for ax, title in panels.items():
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not ax.has_data():
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", color="0.4")
    for ax in (loss, length):
        ax.set_xlabel("optimizer step")
    last = next((r for r in reversed(rows) if _finite(r.get(LOSS))), {})
    fig.suptitle(f"Training curves, per logged step ({sizes_text(last, 'train')} in the last row)", fontsize=11)
    legend = {}  # one entry per label: the training line is in every panel
    for ax in panels:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=2, fontsize=8)
    return fig


def precision_vs_samples(report: Mapping, max_factor: int = 64) -> Figure:
    """Standard error of the prompt set's KL against samples per prompt, one line per estimator.

    sem_within(M) = sqrt(W / (n M)): read off how many samples MC needs to match RB's precision.
    Every line has its own dash pattern and marker shape, and the markers of different lines sit
    at different M, so lines that coincide stay visible.
    """
    fig, ax = _figure()
    n, m = report["prompts"], report["samples_per_prompt"]
    ratio = report.get("within_prompt_var_ratio_mc_over_rb")
    # Far enough right that the MC line reaches RB's precision.
    reach = max(m * max_factor, 2 * m * ratio if _finite(ratio) else 0)
    names = list(report["estimators"])
    per_octave = max(1, len(names))
    grid = [2 ** (i / per_octave) for i in range(math.ceil(math.log2(reach)) * per_octave + 1)]
    for index, name in enumerate(names):
        w = report["estimators"][name]["within_prompt_var"]
        if not _finite(w) or w <= 0:
            continue
        style = _style(name)
        # Line i's markers at M = 2^(j + i / per_octave): never at the same M as another line's.
        ax.plot(
            grid,
            [math.sqrt(w / (n * k)) for k in grid],
            markevery=(index, per_octave),
            markersize=5,
            label=ESTIMATOR_NAMES.get(name, name),
            **style,
        )
        # Hollow, so that measured points at the same height show each other's shapes.
        ax.plot([m], [math.sqrt(w / (n * m))], marker=style["marker"], color=style["color"], ms=10, mew=1.5, mfc="none")
    rb = report["estimators"].get("rb", {}).get("within_prompt_var")
    if _finite(rb) and rb > 0:
        target = math.sqrt(rb / (n * m))
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"RB's precision at M = {m}")
        if _finite(ratio):
            label = f"MC reaches it at M = {ratio * m:.0f}"
            ax.plot([ratio * m], [target], "x", color=COLORS["mc"], ms=10, mew=2, ls="none", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    return _finish(
        fig,
        ax,
        "samples per prompt M",
        "standard error of the KL of this prompt set  [nats]",
        f"Precision of each KL estimator ({n} prompts; large markers: measured, M = {m})",
        note=LOG_RATIO,
    )


def _frontier_step(ax: Axes, xs: Sequence[float], ys: Sequence[float], frontier: set[int]) -> None:
    """The frontier as a step line: the best reward reachable within each KL (lower KL, higher reward)."""
    front = sorted(frontier, key=lambda i: (xs[i], ys[i]))
    if front:
        fx, fy = [xs[i] for i in front], [ys[i] for i in front]
        ax.step(fx, fy, where="post", color="black", lw=1, label="Pareto frontier", zorder=2)
        ax.scatter(fx, fy, facecolor="none", edgecolor="black", s=110, lw=1.2, zorder=4)


def pareto(points: Sequence[Mapping], frontier: set[int], group_key: str = "kl_gradient") -> Figure:
    """Final reward vs KL of several runs, the Pareto frontier (low KL, high reward) drawn as a step line."""
    fig, ax = _figure()
    xs, ys = [p["kl"] for p in points], [p["reward"] for p in points]
    for group in sorted({str(p[group_key]) for p in points}):
        mine = [p for p in points if str(p[group_key]) == group]
        ax.scatter(
            [p["kl"] for p in mine],
            [p["reward"] for p in mine],
            color=COLORS.get(group),
            alpha=0.6,
            label=f"{group_key}={group}",
        )
    _frontier_step(ax, xs, ys, frontier)
    _finish(
        fig,
        ax,
        "final KL(policy || reference)",
        "final reward",
        "Runs on the reward-KL plane (ringed: on the frontier)",
        columns=3,
    )
    # compare_runs' label names a run whose objective changed mid-run as mixed ("beta=0.05->0.5 (mixed)").
    texts = [
        p.get("label") or (f"beta={p['beta']}" if p.get("beta") is not None else str(p[group_key])) for p in points
    ]
    order = sorted(range(len(points)), key=lambda i: (i not in frontier, xs[i]))  # the frontier's first
    place_labels(ax, [(xs[i], ys[i]) for i in order], [texts[i] for i in order])
    return fig


def sweep_pareto(grid_points: Sequence[Mapping], frontier: set[int], labels: Sequence[str] | None = None) -> Figure:
    """Grid-point means of a sweep with 95% intervals over seeds, and the means' Pareto frontier.

    `frontier`: indices of the grid points no other grid point dominates; `labels`: the text
    beside each point (default: its grid-point label).
    """
    fig, ax = _figure()
    xs, ys = [p["kl_mean"] for p in grid_points], [p["reward_mean"] for p in grid_points]
    for group in sorted({str(p["estimator"]) for p in grid_points}):
        mine = [p for p in grid_points if str(p["estimator"]) == group]
        ax.errorbar(
            [p["kl_mean"] for p in mine],
            [p["reward_mean"] for p in mine],
            xerr=[_half_width(p["kl_ci95"]) for p in mine] if all(p["kl_ci95"] for p in mine) else None,
            yerr=[_half_width(p["reward_ci95"]) for p in mine] if all(p["reward_ci95"] for p in mine) else None,
            fmt=MARKERS.get(group, "o"),
            capsize=3,
            color=COLORS.get(group),
            label=f"kl_gradient={group}",
        )
    _frontier_step(ax, xs, ys, frontier)
    _finish(
        fig,
        ax,
        "final KL(policy || reference)",
        "final reward",
        "Sweep: grid-point means, 95% CI over seeds (ringed: on the frontier)",
        columns=3,
    )
    texts = list(labels) if labels is not None else [p["label"] for p in grid_points]
    order = sorted(range(len(grid_points)), key=lambda i: (i not in frontier, xs[i]))
    place_labels(
        ax,
        [(xs[i], ys[i]) for i in order],
        [texts[i] for i in order],
        fontsize=7,
    )
    return fig


def _half_width(ci: Sequence[float]) -> float:
    return (ci[1] - ci[0]) / 2
