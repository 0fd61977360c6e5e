"""A trained checkpoint's KL estimates at M samples per prompt, repeated: the paper's KL table.

    python benchmarks/kl_by_samples.py logs/default/version_0/checkpoints/last.ckpt
    python benchmarks/kl_by_samples.py CKPT --samples 2 5 10 --repeats 10 -- --data.test_path=prompts.txt

Runs `train.py test` of the checkpoint once per M and seed (arguments after `--` go to each run),
keeps each run's `kl_report.json` under `--output`, and prints per estimator and M the mean of the
estimates, their standard deviation over the repeats (seeds S..S+R-1: fresh samples, the same
prompts) and the mean standard error the report gave for these prompts (`sem_within`): the
two should agree, and both shrink as 1 / sqrt(M) for an unbiased estimator of a fixed prompt set.
The tests run on a copy of the checkpoint in `--output`, so the run it came from is left as it was.

The test's statistics need M >= 2 (a variance over a prompt's samples), so the paper's M = 1 is
not run; its row is derived from the largest M: the same mean (the estimators are unbiased) and
the standard error for these prompts times sqrt(M), since sem_within^2 = mean_i s2_i / (n M).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_test(checkpoint: Path, samples: int, seed: int, extra: list[str]) -> dict:
    """One `train.py test` of the checkpoint; its report, read from the run folder it wrote into."""
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "test",
        f"--ckpt_path={checkpoint}",
        f"--seed_everything={seed}",
        f"--model.init_args.sampling.test_samples_per_prompt={samples}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"train.py test failed (M={samples}, seed {seed}):\n{done.stderr[-2000:]}")
    return json.loads((checkpoint.parent.parent / "kl_report.json").read_text())


def row(name: str, samples: int, reports: list[dict]) -> dict:
    """One estimator at one M: the mean of its estimates, their std over the repeats, the mean s.e."""
    means = [r["estimators"][name]["mean"] for r in reports]
    return {
        "estimator": name,
        "samples": samples,
        "mean": statistics.fmean(means),
        "std_over_repeats": statistics.stdev(means),
        "mean_sem_within": statistics.fmean(r["estimators"][name]["sem_within"] for r in reports),
        "repeats": len(reports),
    }


def paired_difference(first: str, second: str, reports: list[dict]) -> str:
    """first - second over the repeats, each repeat's two estimates from the same samples: mean, s.e., t."""
    differences = [r["estimators"][first]["mean"] - r["estimators"][second]["mean"] for r in reports]
    mean, sem = statistics.fmean(differences), statistics.stdev(differences) / len(differences) ** 0.5
    return f"{first} - {second} = {mean:+.4f} ± {sem:.4f} (t = {mean / sem:+.2f}, {len(differences) - 1} df)"


def derived_single_sample(largest: dict) -> dict:
    """The M = 1 row from the largest M's: its mean, and its standard error times sqrt(M)."""
    scale = largest["samples"] ** 0.5
    return {
        **largest,
        "samples": 1,
        "derived_from": largest["samples"],
        "std_over_repeats": float("nan"),
        "mean_sem_within": largest["mean_sem_within"] * scale,
        "repeats": 0,
    }


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("checkpoint", type=Path, help="a run's checkpoint")
    parser.add_argument("--samples", type=int, nargs="+", default=[2, 5, 10], help="samples per prompt, M >= 2")
    parser.add_argument("--repeats", type=int, default=10, help="runs per M")
    parser.add_argument("--first-seed", type=int, default=0, help="the repeats use seeds S, S+1, ...")
    parser.add_argument("--estimators", nargs="+", default=["mc", "rb"])
    parser.add_argument("--output", type=Path, default=Path("kl_by_samples"), help="reports, table, checkpoint copy")
    args, extra = parser.parse_known_args()
    if not args.checkpoint.is_file():
        parser.exit(2, f"error: no checkpoint at {args.checkpoint}\n")
    if args.repeats < 2 or min(args.samples) < 2:
        parser.exit(2, "error: --repeats and every M must be at least 2 (a spread needs two samples)\n")
    return args, [a for a in extra if a != "--"]


def main() -> None:
    args, extra = parse_args()
    # train.py test writes its report and config beside the checkpoint: into a copy, in a run folder of its own.
    checkpoint = args.output / "run" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.checkpoint, checkpoint)
    reports: dict[int, list[dict]] = {}
    total, count = len(args.samples) * args.repeats, 0
    for samples in args.samples:
        for seed in range(args.first_seed, args.first_seed + args.repeats):
            count += 1
            print(f"[{count}/{total}] M={samples} seed={seed}", flush=True)
            reports.setdefault(samples, []).append(run_test(checkpoint, samples, seed, extra))
            shutil.copy(checkpoint.parent.parent / "kl_report.json", args.output / f"M{samples}_seed{seed}.json")
    rows = []
    for name in args.estimators:
        measured = [row(name, samples, reports[samples]) for samples in args.samples]
        rows += [derived_single_sample(max(measured, key=lambda r: r["samples"])), *measured]
    prompts = reports[args.samples[0]][0]["prompts"]
    print(f"\nKL of {args.checkpoint} against its reference, {prompts} prompts, {args.repeats} repeats per M:")
    print("| estimator | M | mean | std over repeats | mean s.e. (these prompts) |\n|---|---:|---:|---:|---:|")
    for r in rows:
        derived = " (derived)" if "derived_from" in r else ""
        print(
            f"| {r['estimator']} | {r['samples']}{derived} | {r['mean']:.4f} | {r['std_over_repeats']:.4f} "
            f"| {r['mean_sem_within']:.4f} |"
        )
    if len(args.estimators) > 1:
        for samples in args.samples:
            print(f"M={samples}: " + paired_difference(*args.estimators[:2], reports[samples]))
    (args.output / "table.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows}, indent=2))
    print(f"wrote {args.output / 'table.json'}")


if __name__ == "__main__":
    main()
