"""Sweeps over a grid of options with several seeds, run locally (docs/experiments.md, "Sweeps").

    python sweep.py --config configs/default.yaml \
      --grid model.init_args.objective.beta=0.02,0.05,0.1 --grid model.init_args.objective.kl_gradient=rb,mc \
      --seeds 3 --name beta_sweep --parallel 2 [--trainer.max_epochs=2 ...]

Every grid point x seed is one `train.py fit` with those overrides and `--seed_everything`, in
its own run folder `<save_dir>/<name>/<run id>/version_0` (save_dir: the config's logger's).
`<save_dir>/<name>/manifest.json` records each run's grid point, seed, status and folder.
Running the same command again skips finished runs and resumes the others from their
`last.ckpt`. The sweep ends with `compare-runs` over its folder: per grid point the mean and
95% interval over seeds, and the share of the reward-KL Pareto frontier per estimator with a
bootstrap interval over seeds.

`--launcher slurm` submits the runs as one job array through submitit (`pip install -e
".[slurm]"`), one array task per run with `--tasks-per-node` equal to the trainer's devices,
as Lightning requires. submitit owns requeueing: before the time limit it forwards SIGTERM to
the run, which saves `last.ckpt` and exits (cli.py), and resubmits the same run, which resumes
from it. Lightning's own SLURM requeue is switched off for these runs so that only one acts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from itertools import product
from pathlib import Path

import yaml
from rich.progress import Progress

from ..training.options import near_names
from . import compare_runs

MANIFEST = compare_runs.MANIFEST
NO_LIGHTNING_REQUEUE = {
    "class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment",
    "init_args": {"auto_requeue": False},
}


def parse_grid(specs: list[str]) -> dict[str, list[str]]:
    """['model.init_args.objective.beta=0.02,0.05'] -> {'model.init_args.objective.beta': ['0.02', '0.05']}."""
    grid = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(items):
            raise ValueError(f"--grid {spec!r}: expected KEY=V1,V2,... with no empty value")
        if key in grid:
            raise ValueError(f"--grid {key} is given twice")
        grid[key] = items
    if not grid:
        raise ValueError("give at least one --grid KEY=V1,V2,...")
    return grid


def run_id(point: dict[str, str], seed: int) -> str:
    """'beta=0.02,kl_gradient=rb,seed=0': the last part of each key, readable in a folder name."""
    return compare_runs.point_label({**point, "seed": seed}, sep=",")


def flat_keys(config: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys.add(name)
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{name}.")
    return keys


def resolved_config(train: Path, config: Path, overrides: list[str]) -> dict:
    """The full config `train.py fit` would use, from --print_config (no model is built)."""
    cmd = [sys.executable, str(train), "fit", "--config", str(config), *overrides, "--print_config"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(no message)"]
        raise ValueError(f"the sweep's base command is refused: {lines[-1]}")
    return yaml.safe_load(result.stdout)


def check_grid_keys(grid: dict[str, list[str]], known: set[str]) -> None:
    for key in grid:
        if key not in known:
            near = near_names(key, known)
            hint = f"; near names: {', '.join(near)}" if near else ""
            raise ValueError(f"--grid {key} is not an option of `train.py fit`{hint}")


def fingerprint(config: Path, passthrough: list[str], grid: dict[str, list[str]]) -> str:
    """What makes two invocations the same sweep: the config's text, the fixed overrides, the grid keys."""
    text = json.dumps([config.read_text(), passthrough, sorted(grid)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_manifest(sweep_dir: Path, print_: str) -> dict:
    path = sweep_dir / MANIFEST
    if not path.is_file():
        return {"fingerprint": print_, "runs": {}}
    manifest = json.loads(path.read_text())
    if manifest.get("fingerprint") != print_:
        raise ValueError(f"{sweep_dir} holds a sweep of another config, overrides or grid keys: choose another --name")
    return manifest


def save_manifest(sweep_dir: Path, manifest: dict) -> None:
    tmp = sweep_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(sweep_dir / MANIFEST)


def command(train: Path, config: Path, point: dict, seed: int, passthrough: list[str], sweep_dir: Path) -> list[str]:
    rid = run_id(point, seed)
    cmd = [sys.executable, str(train), "fit", "--config", str(config), f"--seed_everything={seed}"]
    cmd += [f"--{k}={v}" for k, v in point.items()] + passthrough
    cmd += [
        f"--trainer.logger.init_args.save_dir={sweep_dir}",
        f"--trainer.logger.init_args.name={rid}",
        "--trainer.logger.init_args.version=0",
        "--trainer.enable_progress_bar=false",
    ]
    last = sweep_dir / rid / "version_0" / "checkpoints" / "last.ckpt"
    return cmd + (["--ckpt_path", str(last)] if last.is_file() else [])


class SweepRun:
    """One run of the sweep: `train.py fit` in a subprocess; as a submitit job, requeued from last.ckpt."""

    def __init__(
        self,
        train: Path,
        config: Path,
        point: dict,
        seed: int,
        passthrough: list[str],
        sweep_dir: Path,
        submitit: bool = False,
    ):
        self.args = (train, config, point, seed, passthrough, sweep_dir)
        self.submitit = submitit  # submitted as a job: submitit requeues it, not Lightning
        self.process: subprocess.Popen | None = None

    def __call__(self) -> int:
        """Run to the end; the exit code. Its output goes to `<sweep>/<run id>.log`."""
        # Built when the job starts, so a requeued job finds the last.ckpt of its first attempt.
        cmd = command(*self.args)
        if self.submitit and os.environ.get("SLURM_JOB_ID"):  # on the cluster: submitit requeues, not Lightning
            cmd += [f"--trainer.plugins={json.dumps(NO_LIGHTNING_REQUEUE)}"]
        log = self.args[-1] / f"{run_id(self.args[2], self.args[3])}.log"
        with open(log, "a") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            return self.process.wait()

    def checkpoint(self, *args, **kwargs):
        import submitit

        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # the run saves last.ckpt and exits 143
            self.process.wait()
        self.process = None
        return submitit.helpers.DelayedSubmission(self)


def submit_slurm(runs: list[SweepRun], sweep_dir: Path, args: argparse.Namespace, devices: int) -> list:
    import submitit

    executor = submitit.AutoExecutor(folder=sweep_dir / "slurm", cluster=args.cluster)
    executor.update_parameters(
        name=args.name,
        timeout_min=args.time,
        nodes=args.nodes,
        tasks_per_node=devices,
        gpus_per_node=args.gpus_per_node,
        slurm_partition=args.partition,
        slurm_array_parallelism=args.parallel,
    )
    with executor.batch():
        jobs = [executor.submit(run) for run in runs]
    return jobs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the task config every run starts from")
    parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,...; repeat for more keys")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per grid point")
    parser.add_argument("--name", required=True, help="the sweep's folder under the logger's save_dir")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local", help="where runs execute")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (local), array tasks at a time (slurm)")
    slurm = parser.add_argument_group("slurm launcher (submitit)")
    slurm.add_argument("--partition", default=None, help="SLURM partition")
    slurm.add_argument("--time", type=int, default=60, help="time limit per run, minutes")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes per run (set --trainer.num_nodes alike)")
    slurm.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node")
    slurm.add_argument(
        "--cluster", choices=["slurm", "local", "debug"], default="slurm", help="submitit executor (local: no cluster)"
    )
    return parser


def prepare(args: argparse.Namespace, passthrough: list[str], train: Path) -> tuple[dict, Path, Path, dict, str]:
    """Checks the sweep before any run: (grid, config, sweep folder, manifest, devices per node)."""
    bad = [a for a in passthrough if not (a.startswith("--") and "=" in a)]
    if bad:
        raise ValueError(f"extra arguments pass to every run as --key=value; got {' '.join(bad)}")
    if args.seeds < 1 or args.parallel < 1:
        raise ValueError(f"--seeds and --parallel must be >= 1, got {args.seeds} and {args.parallel}")
    if not args.config.is_file():
        raise ValueError(f"--config {args.config}: no such file")
    grid = parse_grid(args.grid)
    config = args.config.resolve()
    base = resolved_config(train, config, passthrough)
    check_grid_keys(grid, flat_keys(base))
    save_dir = Path((base["trainer"].get("logger") or {}).get("init_args", {}).get("save_dir", "logs"))
    sweep_dir = (save_dir / args.name).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(sweep_dir, fingerprint(config, passthrough, grid))
    devices = str(base["trainer"].get("devices"))
    if args.launcher == "slurm" and not devices.isdigit():
        raise ValueError(f"SLURM needs the devices per node as a number: set --trainer.devices=N (got {devices})")
    return grid, config, sweep_dir, manifest, devices


def pending_runs(grid: dict, seeds: int, manifest: dict, sweep_dir: Path) -> list[tuple[str, dict, int]]:
    """(run id, grid point, seed) of every run not yet finished; the manifest gains the new ones."""
    todo = []
    for values, seed in product(product(*grid.values()), range(seeds)):
        point = dict(zip(grid, values, strict=True))
        rid = run_id(point, seed)
        entry = manifest["runs"].setdefault(rid, {"point": point, "seed": seed, "status": "pending"})
        entry["run_dir"] = str(sweep_dir / rid / "version_0")
        if entry["status"] != "finished":
            todo.append((rid, point, seed))
    return todo


def record(manifest: dict, sweep_dir: Path, rid: str, code: int) -> None:
    manifest["runs"][rid].update(status="finished" if code == 0 else "failed", returncode=code)
    save_manifest(sweep_dir, manifest)


def main(argv: list[str] | None = None, train: Path = Path("train.py")) -> int:
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    try:
        grid, config, sweep_dir, manifest, devices = prepare(args, passthrough, train)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    todo = pending_runs(grid, args.seeds, manifest, sweep_dir)
    save_manifest(sweep_dir, manifest)
    print(f"{len(manifest['runs'])} runs in {sweep_dir}: {len(todo)} to run, {len(manifest['runs']) - len(todo)} done")
    if args.launcher == "slurm":
        runs = [SweepRun(train, config, point, seed, passthrough, sweep_dir, submitit=True) for _, point, seed in todo]
        jobs = submit_slurm(runs, sweep_dir, args, int(devices))
        for (rid, _, _), job in zip(todo, jobs, strict=True):
            manifest["runs"][rid].update(status="submitted", job_id=str(job.job_id))
        save_manifest(sweep_dir, manifest)
        print(f"submitted {len(jobs)} runs as a job array; `compare-runs {sweep_dir}` once they are done")
        if args.cluster == "slurm":
            return 0
        for (rid, _, _), job in zip(todo, jobs, strict=True):  # local or debug executor: wait, as locally
            record(manifest, sweep_dir, rid, job.result())
        todo = []

    with Progress() as progress, ThreadPoolExecutor(max_workers=args.parallel) as pool:
        task = progress.add_task("runs", total=len(todo))
        futures = {
            pool.submit(SweepRun(train, config, point, seed, passthrough, sweep_dir)): rid for rid, point, seed in todo
        }
        for future in as_completed(futures):
            rid, code = futures[future], future.result()
            record(manifest, sweep_dir, rid, code)
            if code != 0:
                progress.console.print(f"run {rid} failed (exit {code}): see {sweep_dir / (rid + '.log')}")
            progress.advance(task)

    failed = [rid for rid, run in manifest["runs"].items() if run["status"] != "finished"]
    if failed:
        print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}; run the same command again to retry")
    compare_runs.main([str(sweep_dir), "--output", str(sweep_dir / "comparison")])
    return 1 if failed else 0
