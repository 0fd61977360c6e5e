"""Interrupt `train.py fit` (SIGKILL, SIGTERM) and resume it with `--ckpt_path last`, as a user would."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

PROJECT = Path(__file__).resolve().parents[1]
# The offline default, small: a last.ckpt every 3 steps, an epoch of 20 steps.
BASE = [
    "fit",
    "--config",
    str(PROJECT / "configs/default.yaml"),
    "--last_checkpoint.every_n_train_steps=3",
    "--trainer.enable_progress_bar=false",
    "--trainer.limit_val_batches=1",
    "--model.init_args.sampling.val_samples_per_prompt=2",
]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT / "src"), os.environ.get("PYTHONPATH", "")])}


def start(cwd: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, str(PROJECT / "train.py"), *BASE, *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(PROJECT / "train.py"), *BASE, *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)


def train_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("train/reward/mean")]


def interrupt_after(cwd: Path, steps: int, sig: int, *args: str) -> subprocess.Popen:
    """Start a long run and send `sig` once `steps` training rows reached metrics.csv."""
    proc = start(cwd, "--trainer.max_steps=200", *args)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = list((cwd / "logs" / "default").glob("version_*/metrics.csv"))
        if runs and len(train_rows(runs[0].parent)) >= steps:
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it was interrupted: " + proc.stderr.read()[-3000:])
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def only_run(cwd: Path) -> Path:
    runs = sorted((cwd / "logs" / "default").glob("version_*"))
    assert len(runs) == 1, runs
    return runs[0]


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.slow
def test_sigkill_then_resume_continues_one_history_with_the_reward_and_the_override(tmp_path):
    killed = interrupt_after(tmp_path, 5, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    run_dir = only_run(tmp_path)
    saved_step = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert saved_step >= 3 and saved_step % 3 == 0

    resumed = run(
        tmp_path, "--ckpt_path", "last", f"--trainer.max_steps={saved_step + 4}", "--model.init_args.objective.beta=0.5"
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert only_run(tmp_path) == run_dir, "a resumed run appends to the run it resumes"
    assert "beta: 0.05 -> 0.5" in resumed.stderr, "a change of objective is reported"

    steps = [int(r["step"]) for r in train_rows(run_dir)]
    assert steps == list(range(saved_step + 4)), "one row per step: none duplicated, none missing"
    rewards = [float(r["train/reward/mean"]) for r in train_rows(run_dir)][saved_step:]
    assert all(r != 0.0 for r in rewards), "the configured reward (VADER) is still on after the resume"

    config = yaml.safe_load((run_dir / f"config.resumed-at-step-{saved_step}.yaml").read_text())
    assert config["model"]["init_args"]["objective"]["beta"] == 0.5, (
        "the command-line override wins over the checkpoint"
    )
    assert config["model"]["init_args"]["reward"]["class_path"].endswith("VaderSentimentReward")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["init_args"]["objective"]["beta"] == 0.05
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == saved_step + 4, "last.ckpt at the end"


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_143(tmp_path):
    stopped = interrupt_after(tmp_path, 4, signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr.read()[-3000:]
    run_dir = only_run(tmp_path)
    last_logged = int(train_rows(run_dir)[-1]["step"])
    saved_step = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert saved_step == last_logged + 1, "the checkpoint holds every step that was logged, not an older one"

    resumed = run(tmp_path, "--ckpt_path", "last", f"--trainer.max_steps={saved_step + 2}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [int(r["step"]) for r in train_rows(run_dir)] == list(range(saved_step + 2))


@pytest.mark.slow
def test_validate_from_a_checkpoint_through_the_cli_keeps_the_reward(tmp_path):
    trained = run(tmp_path, "--trainer.max_steps=3")
    assert trained.returncode == 0, trained.stderr[-4000:]
    checkpoint = only_run(tmp_path) / "checkpoints" / "last.ckpt"
    # No config file: everything, the reward included, comes from the checkpoint.
    cmd = [sys.executable, str(PROJECT / "train.py"), "validate", "--ckpt_path", str(checkpoint)]
    cmd += ["--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = sorted((tmp_path / "logs").rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    rows = [r for r in csv.DictReader(runs[-1].open()) if r.get("val/reward/mean")]
    assert rows and float(rows[-1]["val/reward/mean"]) != 0.0


def test_resuming_last_without_a_checkpoint_is_an_error(tmp_path):
    result = run(tmp_path, "--ckpt_path", "last", "--trainer.max_steps=2")
    assert result.returncode != 0
    assert "no logs/default/version_*/checkpoints/last.ckpt to resume from" in result.stderr


def test_a_checkpoint_without_the_policy_weights_is_refused(tmp_path):
    from {{ cookiecutter.package_name }}.module import RBKLModule

    module = RBKLModule()
    with pytest.raises(ValueError, match="lacks .* of the policy's weights"):
        module.on_load_checkpoint({"state_dict": {}})


@pytest.mark.slow
def test_a_resumed_cpu_run_repeats_the_uninterrupted_one(tmp_path):
    # One process, one thread, a metrics row per step: the same batches and samples after the
    # resume, so every train/* value equals the uninterrupted run's.
    single_thread = {**env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def train(cwd: Path, *args: str) -> None:
        cmd = [sys.executable, str(PROJECT / "train.py"), *BASE, *args]
        result = subprocess.run(cmd, cwd=cwd, env=single_thread, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    train(tmp_path / "a", "--trainer.max_steps=7")
    train(tmp_path / "b", "--trainer.max_steps=3")  # stops mid-epoch (an epoch is 20 steps)
    train(tmp_path / "b", "--trainer.max_steps=7", "--ckpt_path", "last")
    rows = {name: train_rows(only_run(tmp_path / name)) for name in ("a", "b")}
    assert [r["step"] for r in rows["a"]] == [r["step"] for r in rows["b"]] == [str(s) for s in range(7)]
    keys = [k for k in rows["a"][0] if k.startswith("train/") and rows["a"][0][k]]
    assert "train/kl/rb/mean" in keys and "train/reward/mean" in keys
    for uninterrupted, resumed in zip(rows["a"][3:], rows["b"][3:], strict=True):
        for key in keys:
            assert float(resumed[key]) == pytest.approx(float(uninterrupted[key]), rel=1e-6, abs=1e-9), (
                resumed["step"],
                key,
            )


@pytest.mark.slow
def test_a_checkpoint_written_before_the_option_groups_resumes_with_its_options_moved(tmp_path):
    # An option that configs/default.yaml does not set, so the checkpoint's value is the one resumed.
    trained = run(tmp_path, "--trainer.max_steps=3", "--model.init_args.objective.advantage=grpo")
    assert trained.returncode == 0, trained.stderr[-4000:]
    checkpoint = only_run(tmp_path) / "checkpoints" / "last.ckpt"
    # The hyperparameters as the previous release wrote them: every option at the top level.
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    hparams = saved["hyper_parameters"]
    for group in ("objective", "sampling", "updates", "optimization"):
        hparams.update(hparams.pop(group))
    torch.save(saved, checkpoint)
    resumed = run(tmp_path, "--ckpt_path", "last", "--trainer.max_steps=5")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "predates the option groups; its options are read as: beta -> objective.beta" in resumed.stderr
    config = yaml.safe_load((only_run(tmp_path) / "config.resumed-at-step-3.yaml").read_text())
    assert config["model"]["init_args"]["objective"]["advantage"] == "grpo", "the old checkpoint's, not the default"
    assert [int(r["step"]) for r in train_rows(only_run(tmp_path))] == list(range(5))
    # Loaded from Python, it would build with the defaults and drop its options: refused instead.
    from {{ cookiecutter.package_name }}.module import RBKLModule

    torch.save(saved, checkpoint)
    with pytest.raises(ValueError, match="written before the options were grouped .beta -> objective.beta"):
        RBKLModule.load_from_checkpoint(checkpoint)
