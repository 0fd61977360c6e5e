"""Compare finished runs on the reward-KL plane and find the Pareto frontier.

    compare-runs logs/sweep/version_* --output comparison
    python -m {{ cookiecutter.package_name }}.compare_runs logs/*/version_*/metrics.csv

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
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import yaml

from . import plots
from .metrics import kl_key, reward_key

KL_KEY, REWARD_KEY = kl_key("val", "rb", "mean"), reward_key("val", "mean")


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
    return {
        "run": str(csv_path.parent),
        "kl": kl,
        "reward": reward,
        group_key: hparams.get(group_key, "unknown"),
        "beta": hparams.get("beta"),
    }


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
    output.mkdir(parents=True, exist_ok=True)
    (output / "pareto.json").write_text(json.dumps(summary, indent=2))
    plots.pareto(points, frontier, group_key).savefig(output / "pareto.png")
    return summary


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
    try:
        summary = compare(args.runs, args.output, args.kl_key, args.reward_key, args.group_key, strict=args.strict)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    for skip in summary["skipped"]:
        print(f"skipped {skip['run']}: {skip['reason']}")
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} of {len(args.runs)} runs (--strict stops at the first instead)")
    print(f"{len(summary['runs'])} runs; share of the Pareto frontier by {args.group_key}:")
    for group, share in summary["frontier_share"].items():
        print(f"  {group:<10} {share:6.1%}")
    print(f"wrote {args.output / 'pareto.png'} and {args.output / 'pareto.json'}")


if __name__ == "__main__":
    main()
