"""sweep.py through the command line, and the interval-bearing comparison of a sweep folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import drawn_clashes, frontier_line, non_dominated

from {{ cookiecutter.package_name }}.reports import compare_runs
from {{ cookiecutter.package_name }}.reports.compare_runs import MANIFEST, frontier_share, sweep_summary

PROJECT = Path(__file__).resolve().parents[1]


def sweep(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(PROJECT / "sweep.py"), "--config", str(PROJECT / "configs/default.yaml"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_sweep_runs_every_point_and_seed_survives_a_failed_run_and_resumes(tmp_path):
    # beta=-1 is refused by the module: those runs fail, the others go on.
    args = ["--grid", "model.init_args.objective.beta=0.05,-1", "--grid", "model.init_args.objective.kl_gradient=rb,mc"]
    args += ["--seeds", "3", "--name", "tiny", "--parallel", "2", "--trainer.max_epochs=1"]
    args += ["--trainer.limit_val_batches=1", "--data.epoch_repeats=1"]
    first = sweep(tmp_path, *args)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    sweep_dir = tmp_path / "logs" / "tiny"
    manifest = json.loads((sweep_dir / MANIFEST).read_text())
    statuses = {rid: run["status"] for rid, run in manifest["runs"].items()}
    assert len(statuses) == 12
    assert all((s == "failed") == ("beta=-1" in rid) for rid, s in statuses.items()), statuses
    assert (sweep_dir / "beta=0.05,kl_gradient=rb,seed=2" / "version_0" / "metrics.csv").is_file()
    assert "6 run(s) did not finish" in first.stdout
    assert "beta=0.05, kl_gradient=rb" in first.stdout and "95% CI [" in first.stdout
    summary = json.loads((sweep_dir / "comparison" / "pareto.json").read_text())
    assert len(summary["grid_points"]) == 2 and len(summary["skipped"]) == 6

    again = sweep(tmp_path, *args)
    assert "12 runs in" in again.stdout and "6 to run, 6 done" in again.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--grid", "model.init_args.objective.betaa=0.1,0.2"],
            "not an option of `train.py fit`; near names: model.init_args.objective.beta",
        ),
        (["--grid", "model.init_args.beta=0.1"], "near names: model.init_args.objective.beta"),
        (["--grid", "model.init_args.objective.beta=0.1,"], "no empty value"),
        (["--grid", "model.init_args.objective.beta=0.1", "--seeds", "0"], "--seeds and --parallel must be >= 1"),
        (["--grid", "model.init_args.objective.beta=0.1", "stray"], "pass to every run as --key=value"),
    ],
)
def test_bad_sweeps_are_refused_in_one_sentence(tmp_path, args, message):
    result = sweep(tmp_path, "--name", "bad", *args)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "logs").glob("bad/*/version_0")), "no run started"


def test_a_sweep_folder_of_another_config_is_refused(tmp_path):
    folder = tmp_path / "logs" / "other"
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps({"fingerprint": "not-this-one", "runs": {}}))
    result = sweep(tmp_path, "--name", "other", "--grid", "model.init_args.objective.beta=0.1")
    assert result.returncode == 2 and "holds a sweep of another config" in result.stderr


def write_sweep(folder: Path, seeds: int, kl_by_beta: dict[str, float] | None = None, mc_kl: float = 0.0) -> Path:
    """A sweep folder by hand: betas (two by default) x two estimators, final (KL, reward) per seed.

    rb's runs get 0.1 more reward than mc's; `mc_kl` shifts mc's KL (0: rb dominates mc)."""
    runs = {}
    for beta, kl_base in (kl_by_beta or {"0.05": 2.0, "0.2": 1.0}).items():
        for gradient, bonus, shift in (("rb", 0.1, 0.0), ("mc", 0.0, mc_kl)):
            for seed in range(seeds):
                rid = f"beta={beta},kl_gradient={gradient},seed={seed}"
                run_dir = folder / rid / "version_0"
                run_dir.mkdir(parents=True)
                kl, reward = kl_base + shift + 0.05 * seed, kl_base / 2 + bonus + 0.02 * seed
                (run_dir / "metrics.csv").write_text(f"epoch,step,val/kl/rb/mean,val/reward/mean\n0,9,{kl},{reward}\n")
                point = {"model.init_args.objective.beta": beta, "model.init_args.objective.kl_gradient": gradient}
                runs[rid] = {"point": point, "seed": seed, "status": "finished", "run_dir": str(run_dir)}
    (folder / MANIFEST).write_text(json.dumps({"fingerprint": "x", "runs": runs}))
    return folder


def test_sweep_summary_means_intervals_and_bootstrap_shares(tmp_path):
    summary = sweep_summary(write_sweep(tmp_path / "s", seeds=3), tmp_path / "out")
    rows = {r["label"]: r for r in summary["grid_points"]}
    row = rows["beta=0.05, kl_gradient=rb"]
    assert row["seeds"] == 3 and row["kl_mean"] == pytest.approx(2.05)
    lo, hi = row["kl_ci95"]
    # seeds give KL 2.00, 2.05, 2.10: sd 0.05, sem 0.05 / sqrt(3), t(0.975, 2) = 4.303
    assert lo < 2.05 < hi and (hi - lo) / 2 == pytest.approx(4.303 * 0.05 / 3**0.5, rel=1e-3)
    # rb's grid points dominate mc's at the same beta (same KL, higher reward): rb holds the frontier.
    assert summary["frontier_share"]["over_grid_point_means"]["share"] == {"mc": 0.0, "rb": 1.0}
    runs_share = summary["frontier_share"]["over_runs"]
    points = [(float(r["kl"]), float(r["reward"])) for r in _runs(tmp_path / "s")]
    assert runs_share["share"] == frontier_share(points, [r["estimator"] for r in _runs(tmp_path / "s")])
    for name in ("over_runs", "over_grid_point_means"):
        ci = summary["frontier_share"][name]["ci95"]["rb"]
        assert 0.0 <= ci[0] <= summary["frontier_share"][name]["share"]["rb"] <= ci[1] <= 1.0
    again = sweep_summary(tmp_path / "s", tmp_path / "out2")
    assert again["frontier_share"] == summary["frontier_share"], "a fixed bootstrap seed"


def test_fewer_than_three_seeds_give_no_interval_and_say_so(tmp_path):
    summary = sweep_summary(write_sweep(tmp_path / "s", seeds=2), tmp_path / "out")
    entry = summary["frontier_share"]["over_runs"]
    assert entry["ci95"] is None and "fewer than 3 seeds" in entry["note"]


@pytest.mark.parametrize("betas", [1, 3, 8])
def test_the_sweep_plot_draws_the_frontier_of_the_grid_point_means(betas, tmp_path, monkeypatch):
    drawn = []
    draw = compare_runs.plots.sweep_pareto
    monkeypatch.setattr(compare_runs.plots, "sweep_pareto", lambda *args: drawn.append(draw(*args)) or drawn[-1])
    # mc's KL 0.3 lower: the frontier alternates between the estimators.
    kl_by_beta = {f"{0.01 * 2**i:g}": 2.0 / (1 + i) for i in range(betas)}
    folder = write_sweep(tmp_path / "s", seeds=3, kl_by_beta=kl_by_beta, mc_kl=-0.3)
    summary = sweep_summary(folder, tmp_path / "out")
    (fig,) = drawn
    fig.savefig(tmp_path / f"sweep_pareto_{betas}.png")
    means = [(row["kl_mean"], row["reward_mean"]) for row in summary["grid_points"]]
    front = non_dominated(means)
    assert front and [row["on_frontier"] for row in summary["grid_points"]] == [i in front for i in range(len(means))]
    assert frontier_line(fig) == {means[i] for i in front}
    assert drawn_clashes(fig) == []
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels and all(t.startswith("beta=") and "kl_gradient" not in t for t in labels), labels


def _runs(folder: Path) -> list[dict]:
    manifest = json.loads((folder / MANIFEST).read_text())
    out = []
    for run in manifest["runs"].values():
        kl, reward = (Path(run["run_dir"]) / "metrics.csv").read_text().splitlines()[1].split(",")[2:]
        out.append({"kl": kl, "reward": reward, "estimator": run["point"]["model.init_args.objective.kl_gradient"]})
    return out


def test_slurm_submits_one_job_array_with_the_trainers_devices_per_node(tmp_path):
    pytest.importorskip("submitit")
    # Stand-ins: sbatch keeps the script it is given and answers as SLURM does; srun must exist.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    env_path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    args = [
        "--grid",
        "model.init_args.objective.beta=0.05,0.2",
        "--grid",
        "model.init_args.objective.kl_gradient=rb,mc",
        "--seeds",
        "3",
    ]
    args += ["--name", "cluster", "--launcher", "slurm", "--partition", "gpu", "--time", "30", "--gpus-per-node", "2"]
    args += ["--parallel", "4", "--trainer.devices=2"]
    env = {**os.environ, "PATH": env_path, "PYTHONPATH": str(PROJECT / "src")}
    cmd = [sys.executable, str(PROJECT / "sweep.py"), "--config", str(PROJECT / "configs/default.yaml"), *args]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    script = (tmp_path / "submitted.sh").read_text()
    for line in (
        "#SBATCH --array=0-11%4",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --time=30",
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=1",
    ):
        assert line in script, line
    manifest = json.loads((tmp_path / "logs" / "cluster" / MANIFEST).read_text())
    assert {run["status"] for run in manifest["runs"].values()} == {"submitted"}


@pytest.mark.slow
def test_the_slurm_path_runs_through_submitits_local_executor(tmp_path):
    pytest.importorskip("submitit")
    args = ["--grid", "model.init_args.objective.kl_gradient=rb,mc", "--seeds", "1", "--name", "local_array"]
    args += ["--launcher", "slurm", "--cluster", "local", "--trainer.max_steps=2", "--trainer.limit_val_batches=1"]
    args += ["--trainer.val_check_interval=2"]
    result = sweep(tmp_path, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((tmp_path / "logs" / "local_array" / MANIFEST).read_text())
    assert {run["status"] for run in manifest["runs"].values()} == {"finished"}
    assert "share of the Pareto frontier, over runs" in result.stdout
    assert "no interval: fewer than 3 seeds" in result.stdout
