"""The real entry point: `train.py fit --config configs/<name>.yaml`."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import train

PROJECT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(PROJECT) for p in (PROJECT / "configs").rglob("*.yaml"))


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(PROJECT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_fit_runs_the_offline_config_with_fast_dev_run(tmp_path):
    result = run_cli(
        "fit", "--config", str(PROJECT / "configs/default.yaml"), "--trainer.fast_dev_run=true", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_shipped_config_validates(config, capsys):
    args = ["fit", "--config", str(PROJECT / config)]
    if config.parent != Path("configs"):  # trainer/ and logger/ configs compose with a task config
        args = ["fit", "--config", str(PROJECT / "configs/default.yaml"), *args[1:]]
    with pytest.raises(SystemExit) as exit_info:
        train.main(args=[*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].endswith("module.RBKLModule")
    assert "${" not in str(printed), "interpolations must be resolved"


def test_a_config_before_the_subcommand_is_not_accepted():
    with pytest.raises(SystemExit):
        train.main(args=["--config", str(PROJECT / "configs/default.yaml"), "fit"])


@pytest.mark.slow
def test_imdb_config_trains_through_from_pretrained(tmp_path, hf_checkpoints, prompt_files):
    # The paper config with every hub name replaced by a local folder saved in conftest.
    result = run_cli(
        "fit",
        "--config",
        str(PROJECT / "configs/imdb.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.val_check_interval=2",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--model.init_args.policy",
        str(hf_checkpoints["gpt2"]),
        "--model.init_args.reference",
        str(hf_checkpoints["gpt2"]),
        "--model.init_args.reward.init_args.name_or_path",
        str(hf_checkpoints["classifier"]),
        "--model.init_args.max_new_tokens=8",
        "--model.init_args.val_samples_per_prompt=2",
        "--data.source=file",
        "--data.train_path",
        str(prompt_files["train"]),
        "--data.val_path",
        str(prompt_files["val"]),
        "--data.batch_size=2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = next((tmp_path / "logs").rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    rewards = [float(r["train/reward/mean"]) for r in rows if r.get("train/reward/mean")]
    assert len(rewards) == 2 and all(r == r for r in rewards)  # classifier logits, not NaN
    assert any(r.get("val/kl/rb/mean") for r in rows)
