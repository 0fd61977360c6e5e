"""Compare finished runs on the reward-KL plane and find the Pareto frontier.

    compare-runs logs/sweep/version_* --output comparison
    python -m {{ cookiecutter.package_name }}.reports.compare_runs logs/*/version_*/metrics.csv
    compare-runs logs/beta_sweep                 # a sweep folder (sweep.py): intervals over seeds

Each run is a folder with `metrics.csv` (and the `hparams.yaml` Lightning writes beside it), or the
CSV itself. A run's point is its last logged validation reward and KL. A run is on the frontier
when no other run has KL at most as large and reward at least as large, one of them strictly:
the paper reports the share of frontier runs per KL gradient estimator (78% RB vs 22% MC).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..runs.folders import OBJECTIVE_CHANGES, newest_config, read_objective_changes
from ..training.metrics import RATIOS, grad_var_columns, grad_var_key, kl_key, reward_key
from . import plots
from .kl_report import interval

KL_KEY, REWARD_KEY = kl_key("val", "rb", "mean"), reward_key("val", "mean")
MANIFEST = "manifest.json"  # written by sweep.py in a sweep folder
ESTIMATOR_KEY = "model.init_args.objective.kl_gradient"


def pareto_frontier(points: Sequence[tuple[float, float]]) -> set[int]:
    """Indices of the (kl, reward) points that no other point dominates (lower KL, higher reward)."""
    frontier = set()
    for i, (kl_i, r_i) in enumerate(points):
        dominated = any(
            kl_j <= kl_i and r_j >= r_i and (kl_j < kl_i or r_j > r_i) for j, (kl_j, r_j) in enumerate(points) if j != i
        )
        if not dominated:
            frontier.add(i)
    return frontier


def option(hparams: Mapping, name: str, default=None):
    """A module option from hparams.yaml by name: 'beta' finds objective.beta; 'objective.beta' too."""
    value = hparams
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            break
        value = value[part]
    else:
        return value
    groups = [v for v in hparams.values() if isinstance(v, Mapping) and name in v]
    return groups[0][name] if groups else default


def load_run(path: Path, kl_key: str, reward_key: str, group_key: str) -> dict:
    """The last row with both keys in a run's metrics.csv, plus its hyperparameters."""
    csv_path = path if path.suffix == ".csv" else path / "metrics.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: no such metrics file")
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        final = [r for r in rows if r.get(kl_key) and r.get(reward_key)]
        if not final:
            raise ValueError(f"no row has both {kl_key!r} and {reward_key!r}")
        kl, reward = float(final[-1][kl_key]), float(final[-1][reward_key])
        if not (math.isfinite(kl) and math.isfinite(reward)):
            raise ValueError(f"non-finite final values kl={kl}, reward={reward}")
    except (csv.Error, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{csv_path}: unreadable metrics ({err})") from err
    hparams_path = csv_path.parent / "hparams.yaml"
    hparams = {}
    if hparams_path.is_file():
        try:
            hparams = yaml.safe_load(hparams_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{hparams_path}: unreadable hyperparameters ({err})") from err
    changes = read_objective_changes(csv_path.parent)
    return {
        "run": str(csv_path.parent),
        "kl": kl,
        "reward": reward,
        group_key: option(hparams, group_key, "unknown"),
        "beta": option(hparams, "beta"),
        "label": run_label(hparams, changes),
        "objective_changes": changes,
        "reward_name": configured_reward(csv_path.parent),
        **run_grad_variance(rows),
    }


def setting_history(changes: Sequence[Mapping]) -> dict[str, list[tuple[int, Any]]]:
    """{'objective.beta': [(0, 0.05), (3, 0.5)]}: each changed objective setting's values in the order
    the run trained with them, with the step each applied from (objective_changes.yaml, runs/folders.py)."""
    history: dict[str, list[tuple[int, Any]]] = {}
    for entry in changes:
        for key, change in entry["changes"].items():
            values = history.setdefault(key, [(0, change["before"])])
            if values[-1][1] != change["before"]:  # resumed from before an earlier change: its value is gone
                values.append((int(entry["from_step"]), change["before"]))
            values.append((int(entry["from_step"]), change["after"]))
    return {key: values for key, values in history.items() if len({repr(v) for _, v in values}) > 1}


def run_label(hparams: Mapping, changes: Sequence[Mapping]) -> str | None:
    """'beta=0.05' for a run of one objective, 'beta=0.05->0.5 (mixed)' for one whose objective
    changed when it was resumed (None without a beta or a change to name)."""
    history = setting_history(changes)
    names = {key.rsplit(".", 1)[-1]: "->".join(str(v) for _, v in values) for key, values in history.items()}
    beta = option(hparams, "beta")
    if "beta" in names:
        names = {"beta": names.pop("beta"), **names}
    elif beta is not None:
        names = {"beta": str(beta), **names}
    if not names:
        return None
    return ", ".join(f"{name}={value}" for name, value in names.items()) + (" (mixed)" if history else "")


def mixed_objective_warnings(runs: Sequence[Mapping]) -> list[str]:
    """One line per run whose objective changed mid-run: its final point is no single objective's."""
    lines = []
    for run in runs:
        history = setting_history(run.get("objective_changes") or [])
        if history:
            changed = "; ".join(
                f"{key} {values[0][1]}" + "".join(f" -> {value} at step {step}" for step, value in values[1:])
                for key, values in history.items()
            )
            lines.append(
                f"warning: {run['run']} changed its objective when resumed ({changed}; {OBJECTIVE_CHANGES}): "
                f"its point mixes objectives, labelled {run['label']!r}"
            )
    return lines


def configured_reward(run_dir: Path) -> str | None:
    """The reward a run trained with, from the newest config LightningCLI saved in its folder:
    'VaderSentimentReward(include_prompt=True)', 'none' without a reward, None without a config.

    The module keeps the reward out of hparams.yaml (it is an object), so the config is the record.
    """
    path = newest_config(run_dir)
    try:
        config = yaml.safe_load(path.read_text()) or {}
        reward = config["model"]["init_args"]["reward"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    if reward is None:
        return "none"
    if not isinstance(reward, Mapping):
        return str(reward)
    args = ", ".join(f"{k}={v!r}" for k, v in (reward.get("init_args") or {}).items())
    return f"{str(reward.get('class_path', '?')).rsplit('.', 1)[-1]}({args})"


def mixed_rewards_warning(runs: Sequence[Mapping]) -> str | None:
    """One line when the runs were trained with different rewards (their reward axes differ)."""
    counts = Counter(r["reward_name"] for r in runs if r.get("reward_name") is not None)
    if len(counts) < 2:
        return None
    named = ", ".join(f"{name} ({n} run{'s' if n > 1 else ''})" for name, n in sorted(counts.items()))
    return f"warning: the runs were trained with different rewards, so their rewards do not compare: {named}"


# Every gradient-variance ratio a run can log, by its column name (training/metrics.py).
GRAD_VAR_RATIOS = [grad_var_key(stage, quantity, name) for stage, quantity in grad_var_columns() for name in RATIOS]


def run_grad_variance(rows: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """A run's gradient-variance ratios (updates.track_grad_variance, grad_variance_every_n_steps), each
    averaged over the rows that logged it, by column name; empty when none were logged.

    A row whose two KL parts are both zero is left out of its stage's ratios: there the policy is
    its reference (the first step of a run from the reference), the KL gradient is zero whatever
    the estimator, and its shares of 0 would pull the run's mean towards a state it left at once.
    """
    averages = {}
    for stage, quantity in grad_var_columns():
        informative = [r for r in rows if not at_reference(r, stage, quantity)]
        for name in RATIOS:
            key = grad_var_key(stage, quantity, name)
            values = [float(r[key]) for r in informative if r.get(key)]
            values = [v for v in values if math.isfinite(v)]
            if values:
                averages[key] = float(np.mean(values))
    return averages


def at_reference(row: Mapping[str, str], stage: str, quantity: str) -> bool:
    """Whether a probe was taken at the reference: both KL parts logged and exactly 0."""
    parts = [row.get(grad_var_key(stage, quantity, name)) for name in ("kl_mc", "kl_rb")]
    return all(part and float(part) == 0.0 for part in parts)


def compare(
    runs: Sequence[Path],
    output: Path,
    kl_key: str = KL_KEY,
    reward_key: str = REWARD_KEY,
    group_key: str = "kl_gradient",
    strict: bool = True,
) -> dict:
    """Load runs, find the frontier, write `pareto.png` and `pareto.json` under `output`.

    A run that cannot be read (interrupted before its first validation, failed, empty) is an
    error when `strict`, else skipped and listed under "skipped" with the reason.
    """
    if not runs:
        raise ValueError("no runs given")
    points, skipped = [], []
    for run in runs:
        try:
            points.append(load_run(Path(run), kl_key, reward_key, group_key))
        except (FileNotFoundError, ValueError) as err:
            if strict:
                raise
            skipped.append({"run": str(run), "reason": str(err)})
    if not points:
        reasons = "; ".join(s["reason"] for s in skipped)
        raise ValueError(f"none of the {len(runs)} runs has a validation result to compare ({reasons})")
    frontier = pareto_frontier([(p["kl"], p["reward"]) for p in points])
    for i, p in enumerate(points):
        p["on_frontier"] = i in frontier
    on_front = Counter(str(points[i][group_key]) for i in frontier)
    share = {group: on_front[group] / len(frontier) for group in sorted({str(p[group_key]) for p in points})}
    summary = {"kl_key": kl_key, "reward_key": reward_key, "runs": points, "frontier_share": share, "skipped": skipped}
    summary["warnings"] = [w for w in [mixed_rewards_warning(points)] if w] + mixed_objective_warnings(points)
    output.mkdir(parents=True, exist_ok=True)
    (output / "pareto.json").write_text(json.dumps(summary, indent=2))
    plots.pareto(points, frontier, group_key).savefig(output / "pareto.png")
    return summary


def point_label(point: dict, sep: str = ", ") -> str:
    """'beta=0.02, kl_gradient=rb' for a grid point {'model.init_args.objective.beta': '0.02', ...}."""
    return sep.join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())


def frontier_share(points: Sequence[tuple[float, float]], groups: Sequence[str]) -> dict[str, float]:
    """Share of the frontier's points per group (every group present, 0 when it has none there)."""
    frontier = pareto_frontier(points)
    on_front = Counter(groups[i] for i in frontier)
    return {g: on_front[g] / len(frontier) for g in sorted(set(groups))}


def sweep_summary(
    sweep_dir: Path,
    output: Path,
    kl_key: str = KL_KEY,
    reward_key: str = REWARD_KEY,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Per grid point: mean and 95% interval over seeds; frontier shares with bootstrap intervals.

    The share of the frontier per estimator is computed over individual runs (the paper's
    statistic) and over grid-point means. Its interval resamples the seeds of every grid point
    with replacement (`resamples` times, fixed seed) and takes the 2.5 and 97.5 percentiles;
    with fewer than 3 seeds in some grid point there is no interval.
    """
    manifest = json.loads((sweep_dir / MANIFEST).read_text())
    by_point, skipped = runs_by_point(manifest, kl_key, reward_key)
    if not by_point:
        raise ValueError(f"{sweep_dir}: no run of the sweep has a validation result yet")
    grid_points = [grid_point_row(label, by_point[label]) for label in sorted(by_point)]
    frontier = pareto_frontier([(row["kl_mean"], row["reward_mean"]) for row in grid_points])
    for i, row in enumerate(grid_points):
        row["on_frontier"] = i in frontier
    summary = {
        "sweep": str(sweep_dir),
        "kl_key": kl_key,
        "reward_key": reward_key,
        "grid_points": grid_points,
        "frontier_share": frontier_shares(by_point, resamples, seed),
        "skipped": skipped,
        "warnings": [w for w in [mixed_rewards_warning([r for runs in by_point.values() for r in runs])] if w]
        + mixed_objective_warnings([r for runs in by_point.values() for r in runs]),
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "pareto.json").write_text(json.dumps(summary, indent=2))
    # The colour already tells the estimator: a label names the rest of the grid point.
    labels = [point_label({k: v for k, v in row["point"].items() if k != ESTIMATOR_KEY}) for row in grid_points]
    labels = [text or row["estimator"] for text, row in zip(labels, grid_points, strict=True)]
    plots.sweep_pareto(grid_points, frontier, labels).savefig(output / "pareto.png")
    return summary


def runs_by_point(manifest: dict, kl_key: str, reward_key: str) -> tuple[dict[str, list[dict]], list[dict]]:
    """The sweep's finished runs grouped by grid-point label, and the runs that could not be read."""
    by_point: dict[str, list[dict]] = {}
    skipped = []
    for rid, run in manifest["runs"].items():
        try:
            loaded = load_run(Path(run["run_dir"]), kl_key, reward_key, "kl_gradient")
        except (FileNotFoundError, ValueError) as err:
            skipped.append({"run": rid, "reason": str(err)})
            continue
        point = dict(run["point"])
        estimator = str(point.get(ESTIMATOR_KEY, loaded["kl_gradient"]))
        entry = {**loaded, "seed": run["seed"], "estimator": estimator, "point": point}
        by_point.setdefault(point_label(point), []).append(entry)
    return by_point, skipped


def grid_point_row(label: str, runs: list[dict]) -> dict:
    """Mean and t interval over seeds of the final KL and reward of one grid point."""
    row = {"label": label, "point": runs[0]["point"], "estimator": runs[0]["estimator"], "seeds": len(runs)}
    for what in ("kl", "reward"):
        values = np.array([r[what] for r in runs])
        mean = float(values.mean())
        sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
        row[f"{what}_mean"] = mean
        row[f"{what}_ci95"] = interval(mean, sem, df=len(values) - 1) if len(values) > 1 else None
    row.update(grid_point_grad_variance(runs))
    return row


def grid_point_grad_variance(runs: list[dict]) -> dict:
    """Mean and t interval over seeds of each gradient-variance ratio the runs logged."""
    row = {}
    for name in GRAD_VAR_RATIOS:
        values = np.array([r[name] for r in runs if name in r])
        if len(values):
            sem = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
            ci = interval(float(values.mean()), sem, df=len(values) - 1) if len(values) > 1 else None
            row[name] = {"mean": float(values.mean()), "ci95": ci, "seeds": len(values)}
    return row


def frontier_shares(by_point: dict[str, list[dict]], resamples: int, seed: int) -> dict:
    """Each estimator's share of the frontier over runs and over grid-point means, with bootstrap intervals."""
    labels = sorted(by_point)
    seeds = {label: len(by_point[label]) for label in labels}

    def shares(sample: dict[str, list[dict]]) -> tuple[dict[str, float], dict[str, float]]:
        runs = [r for label in labels for r in sample[label]]
        over_runs = frontier_share([(r["kl"], r["reward"]) for r in runs], [r["estimator"] for r in runs])
        means = [(np.mean([r["kl"] for r in sample[lb]]), np.mean([r["reward"] for r in sample[lb]])) for lb in labels]
        over_means = frontier_share(means, [by_point[lb][0]["estimator"] for lb in labels])
        return over_runs, over_means

    share_runs, share_means = shares(by_point)
    result = {"over_runs": {"share": share_runs}, "over_grid_point_means": {"share": share_means}}
    if min(seeds.values()) < 3:
        note = f"no interval: fewer than 3 seeds in a grid point ({min(seeds.values())})"
        for entry in result.values():
            entry["ci95"] = None
            entry["note"] = note
        return result
    rng = np.random.default_rng(seed)
    draws: dict[str, dict[str, list[float]]] = {"over_runs": {}, "over_grid_point_means": {}}
    for _ in range(resamples):
        sample = {lb: [by_point[lb][i] for i in rng.integers(0, seeds[lb], seeds[lb])] for lb in labels}
        for name, share in zip(draws, shares(sample), strict=True):
            for group, value in share.items():
                draws[name].setdefault(group, []).append(value)
    for name, per_group in draws.items():
        result[name]["ci95"] = {
            g: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for g, v in per_group.items()
        }
        result[name]["resamples"] = resamples
    return result


def print_sweep(summary: dict) -> None:
    print(f"{len(summary['grid_points'])} grid points ({summary['sweep']}):")
    print(f"  {'grid point':<40} {'seeds':>5} {'final reward (95% CI)':>28} {'final RB KL (95% CI)':>28}")
    for row in summary["grid_points"]:
        cells = []
        for what in ("reward", "kl"):
            ci = row[f"{what}_ci95"]
            cells.append(f"{row[f'{what}_mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " (1 seed)"))
        print(f"  {row['label']:<40} {row['seeds']:>5} {cells[0]:>28} {cells[1]:>28}")
    for name, entry in summary["frontier_share"].items():
        print(f"share of the Pareto frontier, {name.replace('_', ' ')}:")
        for group, share in entry["share"].items():
            ci = (entry.get("ci95") or {}).get(group)
            print(f"  {group:<10} {share:6.1%}" + (f"  95% CI [{ci[0]:.0%}, {ci[1]:.0%}]" if ci else ""))
        if entry.get("note"):
            print(f"  ({entry['note']})")
    print_grad_variance(summary["grid_points"])
    for skip in summary["skipped"]:
        print(f"skipped {skip['run']}: {skip['reason']}")


def print_warnings(summary: dict) -> None:
    for warning in summary["warnings"]:
        print(warning, file=sys.stderr)


def print_grad_variance(grid_points: Sequence[Mapping]) -> None:
    """The gradient-variance ratios per grid point, when the runs logged them."""
    names = [name for name in GRAD_VAR_RATIOS if any(name in row for row in grid_points)]
    if not names:
        return
    print("gradient variance (mean over the rows that logged it, then over seeds; 95% CI over seeds):")
    print(f"  {'grid point':<40}" + "".join(f"  {name:>30}" for name in names))
    for row in grid_points:
        cells = []
        for name in names:
            entry = row.get(name)
            ci = entry and entry["ci95"]
            cell = "-" if entry is None else f"{entry['mean']:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")
            cells.append(f"  {cell:>30}")  # two spaces: an interval never runs into the next column
        print(f"  {row['label']:<40}" + "".join(cells))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (with metrics.csv) or metrics.csv files")
    parser.add_argument("--output", type=Path, default=Path("comparison"), help="folder for pareto.png and .json")
    parser.add_argument("--kl-key", default=KL_KEY, help="metrics.csv column used as KL")
    parser.add_argument("--reward-key", default=REWARD_KEY, help="metrics.csv column used as reward")
    parser.add_argument("--group-key", default="kl_gradient", help="hyperparameter that groups runs")
    parser.add_argument(
        "--strict", action="store_true", help="stop at a run that cannot be read instead of skipping it"
    )
    args = parser.parse_args(argv)
    if len(args.runs) == 1 and (args.runs[0] / MANIFEST).is_file():
        try:
            summary = sweep_summary(args.runs[0], args.output, args.kl_key, args.reward_key)
        except (FileNotFoundError, ValueError) as err:
            parser.exit(2, f"error: {err}\n")
        print_warnings(summary)
        print_sweep(summary)
        print(f"wrote {args.output / 'pareto.png'} and {args.output / 'pareto.json'}")
        return
    try:
        summary = compare(args.runs, args.output, args.kl_key, args.reward_key, args.group_key, strict=args.strict)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print_warnings(summary)
    for skip in summary["skipped"]:
        print(f"skipped {skip['run']}: {skip['reason']}")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} of {len(args.runs)} runs (--strict stops at the first instead)")
    print(f"{len(summary['runs'])} runs; share of the Pareto frontier by {args.group_key}:")
    for group, share in summary["frontier_share"].items():
        print(f"  {group:<10} {share:6.1%}")
    for run in summary["runs"]:
        ratios = {name: value for name, value in run.items() if name in GRAD_VAR_RATIOS}
        if ratios:
            print(f"  {run['run']}: " + ", ".join(f"{k} {v:.3g}" for k, v in ratios.items()))
    print(f"wrote {args.output / 'pareto.png'} and {args.output / 'pareto.json'}")


if __name__ == "__main__":
    main()
