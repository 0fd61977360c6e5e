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


# Every named pattern of runs/cli_errors.py, triggered through train.py on the pinned jsonargparse:
# (pattern, arguments, config files to write, the sentence). A pattern that jsonargparse's next
# release no longer produces fails here instead of printing a wrong sentence.
MAX_EPOCHES = "trainer:\n  max_epoches: 3\n"
BETTA = "model:\n  init_args:\n    objective:\n      betta: 0.1\n"
PATTERN_CASES = [
    (
        "option_before_subcommand",
        ["--config", DEFAULT, "fit"],
        "options go after the subcommand: python train.py fit --config FILE [--other.options] "
        "(--config or an option came before 'fit')",
    ),
    (
        "unrecognized_arguments",
        ["fit", "--config", DEFAULT, "--trainer.max_epoches=3"],
        "--trainer.max_epoches is not an option; near names: --trainer.max_epochs, --trainer.min_epochs, "
        "--trainer.max_steps, --trainer.max_time (python train.py fit --help lists them)",
    ),
    (
        "option_not_accepted",
        ["fit", "--config", DEFAULT, "--model.init_args.betta=0.1"],
        "--model.init_args.betta is not an option; near names: --model.init_args.objective.beta "
        "(python train.py fit --model.help RBKLModule lists them)",
    ),
    (
        "subcommand_refuses_option",
        ["fit", "--config", DEFAULT, "--config", "max_epoches.yaml"],
        "--trainer.max_epoches is not an option; near names: --trainer.max_epochs, --trainer.min_epochs, "
        "--trainer.max_steps, --trainer.max_time (python train.py fit --help lists them)",
    ),
    (
        "group_refuses_option",
        ["fit", "--config", DEFAULT, "--config", "betta.yaml"],
        "--model.init_args.objective.betta is not an option; near names: --model.init_args.objective.beta, "
        "--model.init_args.objective, --model.init_args.objective.advantage, "
        "--model.init_args.objective.detach_reward_kl (python train.py fit --model.help RBKLModule lists them)",
    ),
    (
        "class_path_not_importable",
        ["fit", "--config", DEFAULT, "--model.init_args.reward.class_path=my_rewards.Missing"],
        "model.init_args.reward: cannot import class_path 'my_rewards.Missing': No module named 'my_rewards' "
        "(a module of your own goes in the project root, next to train.py, which is on its import path)",
    ),
    (
        "not_a_reward_class",
        ["fit", "--config", DEFAULT, "--model.init_args.reward.class_path=json.JSONDecoder"],
        "model.init_args.reward: json.JSONDecoder is not a Reward class; a reward function "
        "(prompts, completions, **kwargs) -> list[float] is given by its dotted path alone: reward: json.JSONDecoder",
    ),
    (
        "no_union_type_fits",
        ["fit", "--config", DEFAULT, "--trainer.max_epochs=two"],
        "trainer.max_epochs: expected int or null, got 'two'",
    ),
    (
        "wrong_type",
        ["fit", "--config", DEFAULT, "--data.batch_size=abc"],
        "data.batch_size: Expected a <class 'int'>. Got value: abc",
    ),
    ("missing_file", ["fit", "--config", "{tmp}/nope.yaml"], "config: File does not exist: '{tmp}/nope.yaml'"),
]


def refused_in_process(args: list[str], tmp_path: Path, capsys, monkeypatch) -> tuple[str, list]:
    """The stderr of `train.py ARGS` run in this process, and each (pattern, sentence) explained."""
    import train
    from {{ cookiecutter.package_name }}.runs import cli_errors

    explained = []

    def explain(message, parser=None):
        explained.append(found := real_explain(message, parser))
        return found

    real_explain = cli_errors.explain
    monkeypatch.setattr(cli_errors, "explain", explain)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "max_epoches.yaml").write_text(MAX_EPOCHES)
    (tmp_path / "betta.yaml").write_text(BETTA)
    with pytest.raises(SystemExit) as exit_info:
        train.main(args=[arg.format(tmp=tmp_path) for arg in args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err, explained


@pytest.mark.parametrize("pattern, args, sentence", PATTERN_CASES, ids=[case[0] for case in PATTERN_CASES])
def test_each_named_pattern_gives_its_sentence(tmp_path, capsys, monkeypatch, pattern, args, sentence):
    stderr, explained = refused_in_process(args, tmp_path, capsys, monkeypatch)
    assert explained and explained[-1][0] == pattern, explained
    assert stderr == f"error: {sentence.format(tmp=tmp_path)}\n"


def test_every_named_pattern_has_a_case():
    from {{ cookiecutter.package_name }}.runs.cli_errors import PATTERNS

    assert [case[0] for case in PATTERN_CASES] == [pattern.name for pattern in PATTERNS]


def test_a_message_no_pattern_matches_is_printed_as_jsonargparse_wrote_it(tmp_path, capsys, monkeypatch):
    # A group given as a number: jsonargparse's "Unable to load config", which no pattern rewrites.
    args = ["fit", "--config", DEFAULT, "--model.init_args.objective=3"]
    stderr, explained = refused_in_process(args, tmp_path, capsys, monkeypatch)
    ((pattern, printed),) = explained
    assert pattern is None and "Unable to load config '3'" in printed
    assert stderr == f"error: {printed}\n"
    # A stray word: "unrecognized arguments" names no option, so that pattern declines to write a sentence.
    stderr, explained = refused_in_process(["fit", "--config", DEFAULT, "stray"], tmp_path, capsys, monkeypatch)
    assert (
        explained[-1] == (None, "unrecognized arguments: stray") and stderr == "error: unrecognized arguments: stray\n"
    )


def test_a_reworded_message_falls_through_unchanged():
    from {{ cookiecutter.package_name }}.runs.cli_errors import explain

    # jsonargparse's report of an unknown model option, as a later release might word it.
    reworded = (
        'Parser key "model":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
        "    - Problem with given class_path 'pkg.Module':\n        Unknown option 'betta'"
    )
    assert explain(reworded) == (None, reworded)


@pytest.mark.parametrize(
    "text, sentence",
    [
        (
            "a:\n\tb: 1\n",
            "line 2, column 1: found character '\\t' that cannot start any token; YAML indents with spaces, not tabs",
        ),
        (
            "trainer:\n  max_epochs: [1, 2\n",
            "line 3, column 1: expected ',' or ']', but got '<stream end>' "
            "(while parsing a flow sequence at line 2, column 15)",
        ),
    ],
    ids=["tab", "unclosed bracket"],
)
def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys, monkeypatch, text, sentence):
    (tmp_path / "bad.yaml").write_text(text)
    stderr, _ = refused_in_process(["fit", "--config", DEFAULT, "--config", "bad.yaml"], tmp_path, capsys, monkeypatch)
    assert stderr == f"error: bad.yaml, {sentence}\n"
