"""The KL evaluation's report: every estimator's estimate with both 95% intervals (no Lightning).

Two intervals answer two questions (docs/estimators.md §7):

    ci95         the KL over a POPULATION of prompts, of which these n are a sample:
                 mean +- t_{0.975, n-1} * sem_prompts (approximate for small n and skewed m_i)
    ci95_within  the KL of THIS prompt set (the prompts fixed, only the samples random):
                 mean +- z_{0.975} * sem_within
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from scipy import stats

from ..training.metrics import kl_key, ratio_key, size_key

# Below this many prompts the population interval is flagged as not to be trusted. Its width
# rests on the spread of n per-prompt means: at n = 20 the sample SD lies within [0.68, 1.31] of
# the true one (95%, normal means), at n = 4 within [0.27, 1.77]; and per-prompt KLs are skewed,
# where Student's t undercovers: a nominal 95% t interval covered 92% at n = 20 and 88% at n = 4
# for exponential means, 85% and 72% for gamma(0.25) means (simulated, 1e5 draws each).
MIN_PROMPTS_FOR_POPULATION = 20


def interval(mean: float, sem: float, df: int | None = None, level: float = 0.95) -> list[float]:
    """[lo, hi]: Student's t with `df` degrees of freedom, or the normal quantile when df is None."""
    quantile = stats.norm.ppf(0.5 + level / 2) if df is None else stats.t.ppf(0.5 + level / 2, df)
    if not (math.isfinite(mean) and math.isfinite(sem)):
        return [float("nan"), float("nan")]
    return [mean - quantile * sem, mean + quantile * sem]


def build_report(
    metrics: Mapping[str, float],
    estimators: Sequence[str],
    *,
    policy: str,
    reference: str,
    max_new_tokens: int,
    stage: str = "test",
) -> dict:
    """The report's dictionary from a stage's logged statistics (the keys of `kl_report.json`)."""
    n = int(metrics[size_key(stage, "prompts")])
    rows = {}
    for name in estimators:
        get = {stat: float(metrics[kl_key(stage, name, stat)]) for stat in ("mean", "sem_prompts", "sem_within")}
        rows[name] = {
            "mean": get["mean"],
            "ci95": interval(get["mean"], get["sem_prompts"], df=n - 1 if n > 1 else None),
            "ci95_within": interval(get["mean"], get["sem_within"]),
            "sem_prompts": get["sem_prompts"],
            "sem_within": get["sem_within"],
            "within_prompt_var": float(metrics[kl_key(stage, name, "within_prompt_var")]),
            "neg_frac": float(metrics[kl_key(stage, name, "neg_frac")]),
        }
    return {
        "policy": policy,
        "reference": reference,
        "prompts": n,
        "samples_per_prompt": round(float(metrics[size_key(stage, "samples_per_prompt")])),
        "max_new_tokens": max_new_tokens,
        "estimators": rows,
        "within_prompt_var_ratio_mc_over_rb": float(metrics.get(ratio_key(stage), float("nan"))),
    }


def population_note(report: Mapping) -> str | None:
    """Why the population-of-prompts intervals cannot be trusted, or None when nothing says so.

    E[sd_i(m_i)^2] = (spread of the prompts' true KLs) + mean_i Var(m_i | x_i) >= E[n sem_within^2]:
    the population interval is expected to be at least as wide as the these-prompts one. Even
    with no spread between prompts (normal m_i), it comes out less than half as wide with
    probability 3.7% at n = 4, 0.9% at n = 8 (chi-square with n - 1 degrees of freedom); merely
    narrower, 23% and 32%, too common to flag.
    """
    n = report["prompts"]
    narrower = [
        name
        for name, row in report["estimators"].items()
        if 2 * (row["ci95"][1] - row["ci95"][0]) < row["ci95_within"][1] - row["ci95_within"][0]
    ]
    notes = []
    if n < MIN_PROMPTS_FOR_POPULATION:
        notes.append(
            f"with {n} prompts (fewer than {MIN_PROMPTS_FOR_POPULATION}) the spread across prompts that sets "
            "the population interval is itself poorly known: do not trust that interval"
        )
    if narrower:
        notes.append(
            f"for {', '.join(narrower)} the population interval came out less than half as wide as the "
            "these-prompts one, although it is at least as wide on average: the prompts' means agree by "
            "chance more closely than their samples' spread predicts"
        )
    text = "; ".join(notes)
    return text[0].upper() + text[1:] + "." if notes else None


def report_markdown(report: Mapping) -> str:
    """A table a person can paste into a paper."""
    lines = [
        f"KL( {report['policy']} || {report['reference']} ) on {report['prompts']} prompts, "
        f"{report['samples_per_prompt']} samples each, responses of at most {report['max_new_tokens']} tokens.",
        "",
        "| estimator | KL | 95% CI, population of prompts | 95% CI, these prompts | within-prompt var | P(<0) |",
        "|---|---:|---|---|---:|---:|",
    ]
    for name, row in report["estimators"].items():
        lo, hi = row["ci95"]
        lo_w, hi_w = row["ci95_within"]
        lines.append(
            f"| {name} | {row['mean']:.4f} | [{lo:.4f}, {hi:.4f}] | [{lo_w:.4f}, {hi_w:.4f}] | "
            f"{row['within_prompt_var']:.4g} | {row['neg_frac']:.2f} |"
        )
    ratio = report["within_prompt_var_ratio_mc_over_rb"]
    lines += [
        "",
        f"Within-prompt variance of MC / RB: {ratio:.3g} (MC needs that many times more samples for RB's precision).",
    ]
    note = population_note(report)
    if note:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"
