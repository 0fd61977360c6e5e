"""The real entry point: `train.py fit --config configs/<name>.yaml`."""

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_kl_evaluation, run_script

import train

PROJECT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(PROJECT) for p in (PROJECT / "configs").rglob("*.yaml"))


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_script("train.py", *args, cwd=cwd, timeout=timeout)


def hub_stand_ins(hf_checkpoints, prompt_files) -> list[str]:
    """Every hub name of the IMDB configs replaced by a local folder saved in conftest."""
    return [
        "--trainer.accelerator=cpu",
        "--trainer.log_every_n_steps=1",
        "--model.init_args.policy",
        str(hf_checkpoints["gpt2"]),
        "--model.init_args.reference",
        str(hf_checkpoints["gpt2"]),
        "--model.init_args.reward.init_args.name_or_path",
        str(hf_checkpoints["classifier"]),
        "--model.init_args.sampling.max_new_tokens=8",
        "--model.init_args.sampling.val_samples_per_prompt=2",
        "--data.source=file",
        "--data.train_path",
        str(prompt_files["train"]),
        "--data.val_path",
        str(prompt_files["val"]),
        "--data.batch_size=2",
    ]


def test_fit_runs_the_offline_config_with_fast_dev_run(tmp_path):
    result = run_cli(
        "fit", "--config", str(PROJECT / "configs/default.yaml"), "--trainer.fast_dev_run=true", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_shipped_config_validates(config, capsys):
    args = ["fit", "--config", str(PROJECT / config)]
    if config.parent != Path("configs"):  # recipe/, trainer/ and logger/ configs compose with a task config
        task = "configs/imdb.yaml" if config.name == "paper.yaml" else "configs/default.yaml"
        args = ["fit", "--config", str(PROJECT / task), *args[1:]]
    with pytest.raises(SystemExit) as exit_info:
        train.main(args=[*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].endswith("module.RBKLModule")
    assert "${" not in str(printed), "interpolations must be resolved"


def test_a_config_before_the_subcommand_is_not_accepted():
    with pytest.raises(SystemExit) as exit_info:
        train.main(args=["--config", str(PROJECT / "configs/default.yaml"), "fit"])
    assert exit_info.value.code not in (0, None)


def test_a_nested_option_can_be_set_to_null_on_the_command_line(capsys):
    from {{ cookiecutter.package_name }}.runs.cli import nulls_as_groups

    argv = ["fit", "--model.init_args.objective.clip_range", "null", "--model.init_args.sampling.vllm.max_model_len=~"]
    assert nulls_as_groups(argv) == [
        "fit",
        '--model.init_args.objective={"clip_range": null}',
        '--model.init_args.sampling={"vllm": {"max_model_len": null}}',
    ]
    left_alone = [
        "--model.init_args.reference=null",  # an init argument itself, not a group's field
        "--model.init_args.sampling.generation_kwargs.top_k=null",  # a dict: the group form would replace it whole
        "--trainer.max_steps=null",
        "--config",
        "null.yaml",
    ]
    assert nulls_as_groups(left_alone) == left_alone
    args = ["fit", "--config", str(PROJECT / "configs/default.yaml"), "--model.init_args.objective.clip_range=0.2"]
    args += ["--model.init_args.objective.beta=0.5", "--model.init_args.sampling.vllm.max_model_len=512"]
    with pytest.raises(SystemExit) as exit_info:
        train.main(
            args=[
                *args,
                "--model.init_args.objective.clip_range=null",
                "--model.init_args.sampling.vllm.max_model_len=null",
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    init = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init["objective"]["clip_range"] is None and init["objective"]["beta"] == 0.5, "the rest of the group kept"
    assert init["sampling"]["vllm"]["max_model_len"] is None and init["sampling"]["max_new_tokens"] == 12


def test_the_checkpoint_settings_go_first_so_that_config_files_and_options_win(tmp_path, capsys):
    from {{ cookiecutter.package_name }}.runs.cli import checkpoint_settings_first
    from {{ cookiecutter.package_name }}.training.module import RBKLModule

    argv = ["fit", "--config", "a.yaml", "--trainer.max_steps=2"]
    spliced = checkpoint_settings_first(argv, "fit", {"class_path": "C", "init_args": {"objective": {"beta": 0.3}}})
    assert spliced == ["fit", "--model", '{"class_path": "C", "init_args": {"objective": {"beta": 0.3}}}', *argv[1:]]
    # Through the CLI: the checkpoint's settings where nothing given now sets them.
    saved = {"objective": {"beta": 0.3, "advantage": "grpo"}, "sampling": {"max_new_tokens": 5, "sampler": "hf"}}
    checkpoint = tmp_path / "last.ckpt"
    torch.save(
        {"global_step": 3, "hyper_parameters": {"_class_path": f"{RBKLModule.__module__}.RBKLModule", **saved}},
        checkpoint,
    )
    args = ["fit", "--config", str(PROJECT / "configs/default.yaml"), "--ckpt_path", str(checkpoint)]
    with pytest.raises(SystemExit) as exit_info:
        train.main(args=[*args, "--model.init_args.objective.beta=0.5", "--print_config"])
    assert exit_info.value.code in (0, None)
    init = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init["objective"]["beta"] == 0.5, "the command line wins over the checkpoint"
    assert init["sampling"]["max_new_tokens"] == 12, "a config file (default.yaml) wins over the checkpoint"
    assert init["objective"]["advantage"] == "grpo" and init["sampling"]["sampler"] == "hf", (
        "not given: the checkpoint's"
    )


@pytest.mark.parametrize(
    "arg, sentence",
    [
        ("--model.init_args.sampling.samples_per_prompt=1", "error: samples_per_prompt must be >= 2"),
        ("--model.init_args.objective.beta=-0.1", "error: beta must be >= 0, got -0.1"),
        (
            "--model.init_args.objective.kl_gradient=foo",
            "error: model.init_args.objective.kl_gradient: Expected a typing.Literal",
        ),
        ("--data.batch_size=abc", "error: data.batch_size: Expected a <class 'int'>. Got value: abc"),
        ("--model.init_args.updates.ppo_epochs=0", "error: ppo_epochs must be >= 1, got 0"),
        ("--model.init_args.objective.clip_range=0", "error: clip_range must be > 0"),
        ("--model.init_args.updates.minibatches=3", "error: minibatches=3 does not divide a batch of 8 prompts"),
        ("--trainer.gradient_clip_val=1.0", "error: trainer.gradient_clip_val is not used by this module"),
        ("--model.init_args.beta=0.1", "error: model.init_args.beta is now model.init_args.objective.beta"),
        ("--trainer.accumulate_grad_batches=2", "error: trainer.accumulate_grad_batches is not used by this module"),
        (
            '--model.init_args.lora={"target_modules": ["q_proj"]}',
            "error: lora target_modules ['q_proj'] match no layer",
        ),
    ],
)
def test_a_bad_option_ends_in_one_sentence_that_names_it(tmp_path, arg, sentence):
    result = run_cli("fit", "--config", str(PROJECT / "configs/default.yaml"), arg, cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(sentence), result.stderr[-2000:]
    if "samples_per_prompt" in arg:
        assert "Traceback" not in result.stderr, "a bad setting is a sentence, not a traceback"


@pytest.mark.slow
def test_imdb_config_trains_through_from_pretrained(tmp_path, hf_checkpoints, prompt_files):
    result = run_cli(
        "fit",
        "--config",
        str(PROJECT / "configs/imdb.yaml"),
        *hub_stand_ins(hf_checkpoints, prompt_files),
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = next((tmp_path / "logs").rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    rewards = [float(r["train/reward/mean"]) for r in rows if r.get("train/reward/mean")]
    assert len(rewards) == 2 and all(r == r for r in rewards)  # classifier logits, not NaN
    assert any(r.get("val/kl/rb/mean") for r in rows)


@pytest.mark.slow
def test_paper_config_trains_with_local_stand_ins(tmp_path, hf_checkpoints, prompt_files):
    # The paper's recipe (4 PPO epochs, clipping, RB KL in the reward) with every hub name local.
    result = run_cli(
        "fit",
        "--config",
        str(PROJECT / "configs/imdb.yaml"),
        "--config",
        str(PROJECT / "configs/recipe/paper.yaml"),
        *hub_stand_ins(hf_checkpoints, prompt_files),
        "--trainer.max_steps=8",
        "--trainer.val_check_interval=2",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--model.init_args.optimization.lr=1e-3",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    steps = [int(r["step"]) for r in rows if r.get("train/reward/mean")]
    assert steps == [0, 4], "one row per batch, at its first of 4 optimizer steps"
    fractions = [float(r["train/clip_fraction"]) for r in rows if r.get("train/clip_fraction")]
    assert len(fractions) == 2 and all(0 <= f <= 1 for f in fractions)
    assert any(r.get("val/kl/rb/mean") for r in rows)


def test_lora_config_trains_offline(tmp_path):
    result = run_cli(
        "fit",
        "--config",
        str(PROJECT / "configs/default.yaml"),
        "--config",
        str(PROJECT / "configs/recipe/lora.yaml"),
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = next((tmp_path / "logs").rglob("last.ckpt"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all("lora_" in key for key in state)


def write_prompts(folder: Path, count: int) -> Path:
    words = ["the movie was", "a film with", "the acting", "i loved the", "what a", "the story is", "the plot"]
    path = folder / "prompts.txt"
    path.write_text("\n".join(words[i % len(words)] + " " * (i // len(words)) for i in range(count)) + "\n")
    return path


@pytest.mark.slow
def test_kl_evaluation_writes_the_report(tmp_path):
    result = run_kl_evaluation(
        "--data.test_path",
        str(write_prompts(tmp_path, 5)),
        "--model.init_args.sampling.test_samples_per_prompt=4",
        "--model.init_args.sampling.max_new_tokens=6",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    run = next((tmp_path / "logs").rglob("kl_report.json")).parent
    report = json.loads((run / "kl_report.json").read_text())
    assert set(report) == {
        "policy",
        "reference",
        "prompts",
        "samples_per_prompt",
        "max_new_tokens",
        "estimators",
        "within_prompt_var_ratio_mc_over_rb",
    }
    assert (report["prompts"], report["samples_per_prompt"], report["max_new_tokens"]) == (5, 4, 6)
    assert report["policy"] == "builtin:tiny-gpt2:seed=0" and report["reference"] == "builtin:tiny-gpt2:seed=1"
    assert set(report["estimators"]) == {"mc", "k2", "k3", "cv", "cv_opt", "rb"}
    for name, row in report["estimators"].items():
        assert set(row) == {"mean", "ci95", "ci95_within", "sem_prompts", "sem_within", "within_prompt_var", "neg_frac"}
        assert row["ci95"][0] < row["mean"] < row["ci95"][1], name
        assert row["ci95_within"][0] < row["mean"] < row["ci95_within"][1], name
    assert report["estimators"]["rb"]["mean"] > 0 and report["within_prompt_var_ratio_mc_over_rb"] > 0
    table = (run / "kl_report.md").read_text()
    assert "| rb |" in table and "95% CI" in table
    assert (run / "kl_precision.png").stat().st_size > 10_000
    assert "test/reward/mean" not in result.stdout, "the report is the table: Lightning's own stays off"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.source=file", "--data.train_path=x.txt"], "`test` needs prompts: set data.test_path"),
        (["--model.init_args.sampling.test_samples_per_prompt=1"], "test_samples_per_prompt must be >= 2"),
    ],
)
def test_kl_evaluation_refuses_bad_input_before_sampling(tmp_path, args, message):
    result = run_cli(
        "test", "--config", str(PROJECT / "configs/kl_eval.yaml"), "--trainer.accelerator=cpu", *args, cwd=tmp_path
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Testing" not in result.stdout


def test_help_says_how_to_list_the_model_options(tmp_path):
    result = run_cli("fit", "--help", cwd=tmp_path)
    assert "python train.py fit --model.help RBKLModule" in " ".join(result.stdout.split())
    model = run_cli("fit", "--model.help", "RBKLModule", cwd=tmp_path)
    assert model.returncode == 0 and "--model.objective.beta" in model.stdout and "KL coefficient" in model.stdout


@pytest.mark.slow
def test_a_first_run_prints_the_bar_the_metrics_and_where_the_files_went(tmp_path):
    result = run_cli("fit", "--config", str(PROJECT / "configs/default.yaml"), "--trainer.max_epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "KL estimators at epoch 0" in result.stdout and "Run folder: logs/default/version_0" in result.stdout
    for noise in ("Tip:", "LeafSpec", "Found 68 module(s)", "Traceback", "Warning", "v_num", "FLOPs"):
        assert noise not in result.stdout + result.stderr, noise
