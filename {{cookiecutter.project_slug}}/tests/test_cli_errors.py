"""A newcomer's mistakes through `train.py`: the last line of stderr names what was wrong and the fix.

Each mistake is refused before training starts, in a few lines: no usage dump, no traceback
(RBKL_TRACEBACK=1 shows it), and an option is never taken from its first letters.
"""

import shutil
from pathlib import Path

import pytest
from conftest import run_script

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT = str(PROJECT / "configs/default.yaml")
QUICK = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"]

TRL_REWARDS = '''
def reward(prompts, completions, **kwargs):
    """TRL's convention: keywords, prompts repeated per completion, one float per completion."""
    return [float(completion.count("good")) for completion in completions]


def half_missing(prompts, completions, **kwargs):
    return [None if i % 2 else 1.0 for i, _ in enumerate(completions)]
'''


def last_line(*args: str, cwd: Path) -> tuple[str, str]:
    result = run_script("train.py", *args, cwd=cwd, timeout=300)
    assert result.returncode != 0, result.stdout[-2000:]
    return result.stderr.strip().splitlines()[-1], result.stderr


@pytest.mark.parametrize(
    "args, sentence",
    [
        (
            ["fit", "--config", DEFAULT, "--model.init_args.betta=0.1"],
            "error: --model.init_args.betta is not an option; near names: --model.init_args.objective.beta "
            "(python train.py fit --model.help RBKLModule lists them)",
        ),
        (
            ["fit", "--config", DEFAULT, "--model.init_args.objective.betta=0.1"],
            "error: --model.init_args.objective.betta is not an option; near names: --model.init_args.objective.beta",
        ),
        (
            ["fit", "--config", DEFAULT, "--model.init_args.reward.init_args.include_promt=false"],
            "error: --model.init_args.reward.init_args.include_promt is not an option; near names: "
            "--model.init_args.reward.init_args.include_prompt "
            "(python train.py fit --model.init_args.reward.help VaderSentimentReward lists them)",
        ),
        (
            ["fit", "--config", DEFAULT, "--model.init_args.reward.class_path=my_rewards.Missing"],
            "error: model.init_args.reward: cannot import class_path 'my_rewards.Missing': No module named "
            "'my_rewards' (a module of your own goes in the project root",
        ),
        (
            ["--config", DEFAULT, "fit"],
            "error: options go after the subcommand: python train.py fit --config FILE",
        ),
        (
            ["fit", "--config", DEFAULT, "--trainer.max_epoches=3"],
            "error: --trainer.max_epoches is not an option; near names: --trainer.max_epochs",
        ),
        (
            ["fit", "--config", DEFAULT, "--trainer.max_epoch=3"],
            "error: --trainer.max_epoch is not an option; near names: --trainer.max_epochs",
        ),
        (
            ["fit", "--config", DEFAULT, "--trainer.max_epochs=two"],
            "error: trainer.max_epochs: expected int or null, got 'two'",
        ),
        (["fit", "--config", "nope.yaml"], "error: config: File does not exist"),
        (
            ["fit", "--config", DEFAULT, "--model.init_args.policy=./nope-model"],
            "error: model.init_args.policy: no folder ./nope-model (a local model is a folder with config.json",
        ),
        (["fit", "--config", DEFAULT, "--data.batch_size=0"], "error: data.batch_size must be >= 1, got 0"),
        (
            ["fit", "--config", DEFAULT, "--data.source=file", "--data.train_path=nope.txt", *QUICK],
            "error: data.train_path nope.txt does not exist",
        ),
        (
            ["fit", "--config", DEFAULT, "--data.source=file", "--data.train_path=empty.txt", *QUICK],
            "error: data.train_path empty.txt holds no prompts",
        ),
    ],
    ids=lambda value: " ".join(value)[-50:] if isinstance(value, list) else None,
)
def test_a_mistake_ends_in_one_line_with_the_fix(tmp_path, args, sentence):
    (tmp_path / "empty.txt").write_text("\n\n")
    last, stderr = last_line(*args, cwd=tmp_path)
    assert last.startswith(sentence), stderr[-3000:]
    assert "usage:" not in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) <= 8, stderr


def test_a_traceback_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("RBKL_TRACEBACK", "1")
    last, stderr = last_line("fit", "--config", DEFAULT, "--data.batch_size=0", cwd=tmp_path)
    assert "Traceback" in stderr and last == "ValueError: data.batch_size must be >= 1, got 0"


def test_help_still_prints_the_usage(tmp_path):
    result = run_script("train.py", "fit", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--trainer.max_epochs" in result.stdout


def project_copy(tmp_path: Path) -> Path:
    """train.py with a reward module beside it, as a user keeps one in the project root."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(PROJECT / "train.py", root)
    (root / "my_rewards.py").write_text(TRL_REWARDS)
    return root


def test_a_trl_reward_function_trains_by_its_dotted_path(tmp_path):
    root = project_copy(tmp_path)
    args = ["fit", "--config", DEFAULT, "--model.init_args.reward=my_rewards.reward", "--trainer.max_steps=2"]
    args += ["--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    result = run_script(str(root / "train.py"), *args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    config = (tmp_path / "logs/default/version_0/config.yaml").read_text()
    assert "reward: my_rewards.reward" in config
    # A resume from the checkpoint alone gets the function back from its stored dotted path.
    checkpoint = tmp_path / "logs/default/version_0/checkpoints/last.ckpt"
    validate = run_script(
        str(root / "train.py"),
        "validate",
        "--ckpt_path",
        str(checkpoint),
        "--trainer.limit_val_batches=1",
        cwd=tmp_path,
    )
    assert validate.returncode == 0, validate.stderr[-3000:]


def test_a_reward_function_gets_the_checks_of_a_reward(tmp_path):
    root = project_copy(tmp_path)
    result = run_script(
        str(root / "train.py"),
        "fit",
        "--config",
        DEFAULT,
        "--model.init_args.reward=my_rewards.half_missing",
        *QUICK,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: non-finite reward nan for prompt")


def test_a_reward_function_by_class_path_is_told_the_dotted_form(tmp_path):
    root = project_copy(tmp_path)
    result = run_script(
        str(root / "train.py"),
        "fit",
        "--config",
        DEFAULT,
        "--model.init_args.reward.class_path=my_rewards.reward",
        cwd=tmp_path,
    )
    assert (
        result.stderr.strip().splitlines()[-1].endswith("is given by its dotted path alone: reward: my_rewards.reward")
    )
