"""A trained checkpoint's KL estimates at M samples per prompt, repeated: the paper's KL table.

    python benchmarks/kl_by_samples.py logs/default/version_0/checkpoints/last.ckpt
    python benchmarks/kl_by_samples.py CKPT --samples 2 5 10 --repeats 10 -- --data.test_path=prompts.txt

Runs `train.py test --ckpt_path CKPT` once per M and seed (arguments after `--` go to each run),
keeps each run's `kl_report.json` under `--output`, and prints per estimator and M the mean of the
estimates, their standard deviation over the repeats (seeds 0..R-1: fresh samples, the same
prompts) and the mean standard error the report gave for these prompts (`sem_within`): the
two should agree, and both shrink as 1 / sqrt(M) for an unbiased estimator of a fixed prompt set.

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

from {{ cookiecutter.package_name }}.runs.folders import run_version

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


def summarise(reports: dict[int, list[dict]], estimators: list[str]) -> list[dict]:
    rows = []
    largest = max(reports)
    for name in estimators:
        runs = reports[largest]
        rows.append(
            {
                "estimator": name,
                "samples": 1,
                "derived_from": largest,
                "mean": statistics.fmean(r["estimators"][name]["mean"] for r in runs),
                "std_over_repeats": float("nan"),
                "mean_sem_within": statistics.fmean(r["estimators"][name]["sem_within"] for r in runs) * largest**0.5,
                "repeats": 0,
            }
        )
        for samples, runs in reports.items():
            means = [r["estimators"][name]["mean"] for r in runs]
            rows.append(
                {
                    "estimator": name,
                    "samples": samples,
                    "mean": statistics.fmean(means),
                    "std_over_repeats": statistics.stdev(means) if len(means) > 1 else float("nan"),
                    "mean_sem_within": statistics.fmean(r["estimators"][name]["sem_within"] for r in runs),
                    "repeats": len(runs),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a run's checkpoint (its folder gets each kl_report.json)")
    parser.add_argument("--samples", type=int, nargs="+", default=[2, 5, 10], help="samples per prompt, M >= 2")
    parser.add_argument("--repeats", type=int, default=10, help="runs per M, seeds 0..R-1")
    parser.add_argument("--estimators", nargs="+", default=["mc", "rb"])
    parser.add_argument("--output", type=Path, default=Path("kl_by_samples"), help="reports and table")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if not args.checkpoint.is_file():
        parser.exit(2, f"error: no checkpoint at {args.checkpoint}\n")
    if run_version(args.checkpoint) is None:
        parser.exit(
            2, f"error: {args.checkpoint} is not in a run folder (.../version_N/checkpoints/), where the reports go\n"
        )
    if args.repeats < 2 or min(args.samples) < 2:
        parser.exit(2, "error: --repeats and every M must be at least 2 (a spread needs two samples)\n")
    args.output.mkdir(parents=True, exist_ok=True)
    reports: dict[int, list[dict]] = {}
    total, count = len(args.samples) * args.repeats, 0
    for samples in args.samples:
        for seed in range(args.repeats):
            count += 1
            print(f"[{count}/{total}] M={samples} seed={seed}", flush=True)
            reports.setdefault(samples, []).append(run_test(args.checkpoint, samples, seed, extra))
            shutil.copy(args.checkpoint.parent.parent / "kl_report.json", args.output / f"M{samples}_seed{seed}.json")
    rows = summarise(reports, args.estimators)
    prompts = reports[args.samples[0]][0]["prompts"]
    print(f"\nKL of {args.checkpoint} against its reference, {prompts} prompts, {args.repeats} repeats per M:")
    print("| estimator | M | mean | std over repeats | mean s.e. (these prompts) |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['estimator']} | {row['samples']}{' (derived)' if 'derived_from' in row else ''} "
            f"| {row['mean']:.4f} | {row['std_over_repeats']:.4f} "
            f"| {row['mean_sem_within']:.4f} |"
        )
    (args.output / "table.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows}, indent=2))
    print(f"wrote {args.output / 'table.json'}")


if __name__ == "__main__":
    main()
