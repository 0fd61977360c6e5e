"""Resume `train.py fit` with `--ckpt_path last`, as a user would: settings, run folders, damaged files.
(tests/test_chaos.py kills runs every way and compares the resumed history with the uninterrupted one.)"""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_chaos import kill_at

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
    path = [str(PROJECT / "src"), str(PROJECT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(PROJECT / "train.py"), *BASE, *args]
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=600)


def train_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("train/reward/mean")]


def only_run(cwd: Path) -> Path:
    runs = sorted((cwd / "logs" / "default").glob("version_*"))
    assert len(runs) == 1, runs
    return runs[0]


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.slow
def test_sigkill_then_resume_continues_one_history_with_the_reward_and_the_override(tmp_path):
    killed = run(tmp_path, "--trainer.max_steps=200", kill_at("SIGKILL", 5))
    assert killed.returncode == -signal.SIGKILL
    run_dir = only_run(tmp_path)
    saved_step = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert saved_step == 3

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
    assert "val/reward/mean" in result.stdout, "Lightning's table of the validation's results"


def test_resuming_last_without_a_checkpoint_is_an_error(tmp_path):
    result = run(tmp_path, "--ckpt_path", "last", "--trainer.max_steps=2")
    assert result.returncode != 0
    assert "no logs/default/version_*/checkpoints/last.ckpt to resume from" in result.stderr


def test_a_checkpoint_without_the_policy_weights_is_refused(tmp_path):
    from {{ cookiecutter.package_name }}.training.module import RBKLModule

    module = RBKLModule()
    with pytest.raises(ValueError, match="lacks .* of the policy's weights"):
        module.on_load_checkpoint({"state_dict": {}})


@pytest.mark.slow
def test_a_truncated_last_checkpoint_falls_back_to_the_older_one_or_is_named(tmp_path):
    # Epochs of 2 steps: epoch=1-step=4.ckpt at the second epoch's end, last.ckpt at step 5 (SIGTERM).
    stopped = run(tmp_path, "--trainer.max_steps=20", "--data.epoch_repeats=1", kill_at("SIGTERM", 4))
    assert stopped.returncode == 143, stopped.stderr[-4000:]
    folder = only_run(tmp_path) / "checkpoints"
    older = folder / "epoch=1-step=4.ckpt"
    assert checkpoint_step(older) == 4 and checkpoint_step(folder / "last.ckpt") == 5
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a disk that filled up mid-save

    named = run(tmp_path, "--ckpt_path", str(last), "--trainer.max_steps=7", "--data.epoch_repeats=1")
    assert named.returncode != 0
    assert named.stderr.strip().splitlines()[-1] == (
        f"error: {last} cannot be read, truncated or corrupt (RuntimeError): resume from the older checkpoint "
        f"beside it, --ckpt_path {older} (step 4)"
    )
    fell_back = run(tmp_path, "--ckpt_path", "last", "--trainer.max_steps=7", "--data.epoch_repeats=1")
    assert fell_back.returncode == 0, fell_back.stderr[-4000:]
    assert f"resuming from the older {older.relative_to(tmp_path)} (step 4) instead" in fell_back.stderr
    assert [int(r["step"]) for r in train_rows(only_run(tmp_path))] == list(range(7)), "steps 4, 5 trained again"


def test_a_failed_start_leaves_no_run_folder_and_a_failed_resume_keeps_its_run(tmp_path):
    failed = run(tmp_path, "--trainer.max_steps=2", "--data.source=file", "--data.train_path=missing.txt")
    assert failed.returncode != 0 and "missing.txt" in failed.stderr.strip().splitlines()[-1]
    assert list((tmp_path / "logs" / "default").glob("version_*")) == [], "the half-made run folder is removed"

    trained = run(tmp_path, "--trainer.max_steps=2")
    assert trained.returncode == 0, trained.stderr[-4000:]
    kept = sorted(p.name for p in only_run(tmp_path).iterdir())
    resumed = run(
        tmp_path, "--ckpt_path", "last", "--trainer.max_steps=4", "--data.source=file", "--data.train_path=missing.txt"
    )
    assert resumed.returncode != 0
    assert sorted(p.name for p in only_run(tmp_path).iterdir()) == kept, "the resumed run's folder stays whole"


def test_the_metrics_rewrite_leaves_the_old_file_whole_when_it_dies_before_the_rename(tmp_path, monkeypatch):
    from {{ cookiecutter.package_name }}.runs.folders import drop_rows_after
    from {{ cookiecutter.package_name }}.training import atomic_files

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,train/reward/mean\n" + "".join(f"{s},0.{s}\n" for s in range(6)))
    before = metrics.read_text()

    def killed(src, dst):
        raise KeyboardInterrupt("killed between the write and the rename")

    monkeypatch.setattr(atomic_files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        drop_rows_after(metrics, 3)
    assert metrics.read_text() == before, "the history is whole"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"], "no temporary file left behind"
    monkeypatch.undo()
    assert drop_rows_after(metrics, 3) == 3
    assert metrics.read_text() == "step,train/reward/mean\n0,0.0\n1,0.1\n2,0.2\n"


def test_a_new_metrics_column_rewrites_the_file_atomically(tmp_path, monkeypatch):
    from {{ cookiecutter.package_name }}.training import atomic_files
    from {{ cookiecutter.package_name }}.training.lightning_internals import AppendingWriter

    writer = AppendingWriter(log_dir=str(tmp_path))
    writer.log_metrics({"train/reward/mean": 0.5}, step=0)
    writer.save()
    before = (tmp_path / "metrics.csv").read_text()
    writer.log_metrics({"val/reward/mean": 0.7}, step=1)  # a new column: Lightning rewrites the whole file
    monkeypatch.setattr(atomic_files.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        writer.save()
    assert (tmp_path / "metrics.csv").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"], "no temporary file left behind"
    monkeypatch.undo()
    writer = AppendingWriter(log_dir=str(tmp_path))  # the run resumed: its writer reads the header back
    writer.log_metrics({"val/reward/mean": 0.7}, step=1)
    writer.save()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    got = [(r["step"], r["train/reward/mean"], r["val/reward/mean"]) for r in rows]
    assert got == [("0", "0.5", ""), ("1", "", "0.7")]


def test_a_checkpoint_without_the_option_groups_is_refused_in_one_sentence(tmp_path):
    import train
    from {{ cookiecutter.package_name }}.training.module import RBKLModule

    module = RBKLModule()
    # The hyperparameters as a release before the option groups wrote them: every option at the top level.
    flat = {
        "_class_path": f"{RBKLModule.__module__}.RBKLModule",
        "policy": "builtin:tiny-gpt2",
        "beta": 0.1,
        "lr": 1e-3,
    }
    checkpoint = tmp_path / "old.ckpt"
    torch.save({"global_step": 3, "state_dict": module.state_dict(), "hyper_parameters": flat}, checkpoint)
    sentence = (
        "the checkpoint was written before the options were grouped (beta, lr, ... at the top level of its "
        "hyperparameters, not objective.beta, optimization.lr, ...): this project does not read such checkpoints; "
        "train again, or continue it with the template release that wrote it"
    )
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(PROJECT / "configs/default.yaml"), "--ckpt_path", str(checkpoint)])
    assert exit_info.value.code == f"error: {checkpoint}: {sentence}"
    # Loaded from Python, it would build with the defaults and drop its options: refused as well.
    with pytest.raises(ValueError) as refused:
        module.on_load_checkpoint(torch.load(checkpoint, weights_only=False))
    assert str(refused.value) == sentence
    module.on_load_checkpoint({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)})


@pytest.mark.slow
def test_sigterm_stops_validate_with_143_in_any_batch_and_says_there_is_nothing_to_continue(tmp_path):
    trained = run(tmp_path, "--trainer.max_steps=2")
    assert trained.returncode == 0, trained.stderr[-4000:]
    checkpoint = only_run(tmp_path) / "checkpoints" / "last.ckpt"
    # A validate run counts no optimizer steps: its global step is 0.
    for batches in (3, 1):  # mid-validation, and in its last batch (which Lightning would ignore)
        cmd = [
            *(sys.executable, str(PROJECT / "train.py"), "validate", "--ckpt_path", str(checkpoint)),
            *("--trainer.enable_progress_bar=false", "--data.batch_size=2", f"--trainer.limit_val_batches={batches}"),
            kill_at("SIGTERM", 0, "on_validation_batch_start"),
        ]
        stopped = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
        assert stopped.returncode == 143, (batches, stopped.stderr[-3000:])
        last = stopped.stderr.strip().splitlines()[-1]
        assert last == "validate stopped by SIGTERM: it has nothing to continue from, run it again", last
