"""Kill a run in every way a cluster does, resume it each time, and get the uninterrupted run's history.

The kills come from inside the run (tests/chaos.py: a signal sent at a given step and hook), so the
moments do not depend on how busy the machine is. One process, one thread: on a CPU the resumed
history must equal the uninterrupted one value for value (1e-6).
"""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parents[1]
# The offline default, small: 8 steps and 2 validation batches per epoch, a last.ckpt every 4 steps.
BASE = [
    "fit",
    "--config",
    str(PROJECT / "configs/default.yaml"),
    "--trainer.enable_progress_bar=false",
    "--trainer.max_steps=22",
    "--data.batch_size=4",
    "--data.epoch_repeats=2",
    "--model.init_args.sampling.val_samples_per_prompt=2",
    "--last_checkpoint.every_n_train_steps=4",
]


def env() -> dict[str, str]:
    path = [str(PROJECT / "src"), str(PROJECT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(PROJECT / "train.py"), *BASE, *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=900)


def kill_at(sig: str, step: int, hook: str = "on_train_batch_start", times: int = 1) -> str:
    spec = {"signal": sig, "step": step, "hook": hook, "times": times}
    return "--trainer.callbacks+=" + json.dumps({"class_path": "chaos.KillAt", "init_args": spec})


def run_dir(cwd: Path) -> Path:
    runs = sorted((cwd / "logs" / "default").glob("version_*"))
    assert len(runs) == 1, runs
    return runs[0]


def rows(cwd: Path) -> list[dict[str, str]]:
    with open(run_dir(cwd) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def checkpoints(cwd: Path) -> dict[str, dict]:
    folder = run_dir(cwd) / "checkpoints"
    return {p.name: torch.load(p, map_location="cpu", weights_only=False) for p in sorted(folder.glob("*.ckpt"))}


def printed_resume(result: subprocess.CompletedProcess) -> list[str]:
    """The options after BASE of the command the stopped run printed on its last line (its own kill left out)."""
    last = result.stderr.strip().splitlines()[-1]
    assert "; continue with: python " in last, result.stderr[-3000:]
    command = shlex.split(last.split("; continue with: ", 1)[1])
    assert command[1:][: len(BASE) + 1] == [str(PROJECT / "train.py"), *BASE], command
    return [arg for arg in command[len(BASE) + 2 :] if not arg.startswith("--trainer.callbacks+=")]


def assert_same_history(expected: list[dict[str, str]], got: list[dict[str, str]]) -> None:
    assert [(r["step"], sorted(k for k, v in r.items() if v)) for r in got] == [
        (r["step"], sorted(k for k, v in r.items() if v)) for r in expected
    ], "the same rows (train steps and validations), with the same columns filled"
    for want, have in zip(expected, got, strict=True):
        for key, value in want.items():
            if value and key != "step":
                assert float(have[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-9, nan_ok=True), (
                    want["step"],
                    key,
                )


def train_uninterrupted(cwd: Path, *args: str) -> Path:
    cwd.mkdir(exist_ok=True)
    result = train(cwd, *args)
    assert result.returncode == 0, result.stderr[-4000:]
    return cwd


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    return train_uninterrupted(tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.slow
def test_a_run_killed_every_way_resumes_to_the_uninterrupted_history(tmp_path, uninterrupted):
    resume = ["--ckpt_path", "last"]
    deaths = [
        # (what kills it, the exit status, what last.ckpt holds afterwards)
        (kill_at("SIGKILL", 6), -signal.SIGKILL, 4),  # mid-epoch, two steps after a periodic save
        (kill_at("SIGKILL", 8, "on_validation_batch_start"), -signal.SIGKILL, 4),  # during validation
        (kill_at("SIGINT", 10), 130, 11),  # Ctrl-C: the batch in flight ends, then a save
        (kill_at("SIGKILL", 14), -signal.SIGKILL, 12),
        (kill_at("SIGINT", 15, times=2), 130, 12),  # Ctrl-C twice: at once, nothing saved; 12 resumes again
        (kill_at("SIGTERM", 16, "on_validation_batch_start"), 143, 16),  # waits for validation's end
        (kill_at("SIGKILL", 17), -signal.SIGKILL, 16),  # just after a save at an epoch's end
    ]
    first = train(tmp_path, deaths[0][0])
    assert first.returncode == deaths[0][1], first.stderr[-3000:]
    for i, (death, status, saved_step) in enumerate(deaths[1:], start=1):
        result = train(tmp_path, *resume, death)
        assert result.returncode == status, (i, result.stderr[-3000:])
        assert checkpoints(tmp_path)["last.ckpt"]["global_step"] == saved_step, i
        if status in (130, 143):
            resume = printed_resume(result)
            assert resume == ["--ckpt_path", str(Path("logs/default/version_0/checkpoints/last.ckpt"))], resume
    finished = train(tmp_path, *resume)
    assert finished.returncode == 0, finished.stderr[-4000:]

    assert_same_history(rows(uninterrupted), rows(tmp_path))
    want, got = checkpoints(uninterrupted), checkpoints(tmp_path)
    assert {n: c["global_step"] for n, c in got.items()} == {n: c["global_step"] for n, c in want.items()}
    for key, weight in want["last.ckpt"]["state_dict"].items():
        torch.testing.assert_close(got["last.ckpt"]["state_dict"][key], weight, rtol=1e-6, atol=1e-8, msg=key)
    assert got["last.ckpt"]["callbacks"] == want["last.ckpt"]["callbacks"], "the plots' history too"
    configs = sorted(p.name for p in run_dir(tmp_path).glob("config*.yaml"))
    # 12 and 16 were each resumed twice: the second resume's config does not collide with the first's.
    assert configs == [
        "config.resumed-at-step-11.yaml",
        "config.resumed-at-step-12.2.yaml",
        "config.resumed-at-step-12.yaml",
        "config.resumed-at-step-16.2.yaml",
        "config.resumed-at-step-16.yaml",
        "config.resumed-at-step-4.2.yaml",
        "config.resumed-at-step-4.yaml",
        "config.yaml",
    ]


# Two epochs of 8 batches, each batch two optimizer steps: 32 steps, a save due every 2 batches.
TWO_UPDATES_PER_BATCH = [
    "--trainer.max_steps=-1",
    "--trainer.max_epochs=2",
    "--model.init_args.updates.ppo_epochs=2",
]


@pytest.mark.slow
def test_an_epoch_based_run_with_two_updates_per_batch_resumes_to_the_same_history(tmp_path):
    expected = train_uninterrupted(tmp_path / "uninterrupted", *TWO_UPDATES_PER_BATCH)
    cwd = tmp_path / "killed"
    cwd.mkdir()
    deaths = [
        # Epoch 0's validation has written its row at step 16; the save due at 16 waits for it, so
        # last.ckpt holds step 12 and the row must go.
        (kill_at("SIGKILL", 16, "on_validation_end"), 12),
        (kill_at("SIGKILL", 18), 16),  # from the save taken at epoch 0's validation end
    ]
    resume = []
    for death, saved_step in deaths:
        result = train(cwd, *TWO_UPDATES_PER_BATCH, *resume, death)
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        assert checkpoints(cwd)["last.ckpt"]["global_step"] == saved_step
        resume = ["--ckpt_path", "last"]
    finished = train(cwd, *TWO_UPDATES_PER_BATCH, *resume)
    assert finished.returncode == 0, finished.stderr[-4000:]

    want, got = rows(expected), rows(cwd)
    validations = [r["step"] for r in want if r.get("val/reward/mean")]
    assert validations == ["16", "32"], "each validation at the optimizer step of the weights it evaluated"
    assert_same_history(want, got)
    weights = [checkpoints(run)["last.ckpt"]["state_dict"] for run in (expected, cwd)]
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-6, atol=1e-8)
