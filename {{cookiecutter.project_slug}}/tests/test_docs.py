"""The documents stay true: options.md is what its generator writes, the README's code runs, and
every file path the README and docs/ name exists."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import torch

import {{ cookiecutter.package_name }} as package
from {{ cookiecutter.package_name }}.kl import sequence_kl
from {{ cookiecutter.package_name }}.models.vocabulary import TRAIN_PROMPTS
from {{ cookiecutter.package_name }}.training.data import PromptDataModule
from {{ cookiecutter.package_name }}.training.module import RBKLModule
from {{ cookiecutter.package_name }}.training.options import Sampling

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(package.__file__).parent
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
TESTED_BLOCK = re.compile(r"<!-- tested: tests/test_docs.py runs this block -->\n```python\n(.*?)\n```", re.DOTALL)


def make_options():
    """docs/make_options.py as a module (docs/ is a folder of documents, not a package)."""
    spec = importlib.util.spec_from_file_location("make_options", ROOT / "docs" / "make_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_md_is_what_its_generator_writes():
    generator = make_options()
    written = generator.generated_part(generator.OPTIONS_MD.read_text(encoding="utf-8"))
    assert written == generator.render(), "docs/options.md is out of date: run python docs/make_options.py"


def test_the_generator_refuses_an_option_without_a_line_in_its_docstring():
    @dataclasses.dataclass
    class Settings:
        """Settings.

        Args:
            size: documented.
            colour: names no option.
        """

        size: int = 1
        speed: float = 2.0

    with pytest.raises(ValueError, match=r"\['speed'\].*\['colour'\]"):
        make_options().section("settings", Settings, "nowhere.py")


def test_every_data_option_is_in_options_md():
    text = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    section = text.split("## `data`", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    options = [name for name in inspect.signature(PromptDataModule.__init__).parameters if name != "self"]
    assert documented == options, "run python docs/make_options.py"
    assert "num_val_prompts" in documented


def readme_blocks() -> list[str]:
    blocks = TESTED_BLOCK.findall(README.read_text(encoding="utf-8"))
    assert len(blocks) == 2, "the README's subclass and kl blocks are marked for this test"
    return blocks


def run_block(code: str) -> dict:
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_the_readme_kl_block_runs_and_says_what_it_computes():
    (block,) = [b for b in readme_blocks() if "fused_token_stats(" in b]
    torch.manual_seed(0)
    ns = run_block(block)
    batch = ns["tokens"].shape[0]
    assert ns["kl"].shape == ns["rb"].shape == (batch,)
    assert ns["policy_logits"].grad is not None and ns["h_p"].grad is None
    # The comment's claim: the fused statistics give the rb estimate of the materialised logits.
    logits_p, logits_q = ns["h_p"] @ ns["w_p"].T, ns["h_q"] @ ns["w_q"].T
    expected = sequence_kl(logits_p, logits_q, ns["tokens"], ns["mask"], "rb")
    torch.testing.assert_close(ns["rb"], expected, rtol=1e-5, atol=1e-5)


def test_the_readme_subclass_block_trains_on_its_own_rewards_and_loss():
    (block,) = [b for b in readme_blocks() if "RBKLModule" in b]
    ns = run_block(block)
    (task_class,) = [
        v for v in ns.values() if isinstance(v, type) and issubclass(v, RBKLModule) and v is not RBKLModule
    ]
    torch.manual_seed(0)
    task = task_class(sampling=Sampling(samples_per_prompt=2, max_new_tokens=6))
    rollout = task.rollout(list(TRAIN_PROMPTS[:3]), 2)
    lengths = torch.tensor([len(r.split()) for r in rollout.responses], dtype=rollout.rewards.dtype)
    torch.testing.assert_close(rollout.rewards, -lengths / 4)  # its score
    out = task.model_step(rollout)  # through its compute_loss
    out.loss.loss.backward()
    assert torch.isfinite(out.loss.loss) and out.loss.per_sample.shape == (6,)
    # Its compute_loss clips the rewards before the leave-one-out baseline (k = 2: R_i - R_j).
    rewards = torch.tensor([3.0, 0.0, -0.5, 0.5, -2.0, -1.0])
    parts = task.compute_loss(out.stats, dataclasses.replace(rollout, rewards=rewards), task.objective)
    assert parts.advantage.tolist() == [1.0, -1.0, -1.0, 1.0, 0.0, 0.0]


def test_the_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move reference material to docs/"
    headings = [line for line in lines if line.startswith("## ")]
    for part in ("Quick start", "What a run leaves", "Configurations", "Extending", "`kl` API", "Where things are"):
        assert any(part in heading for heading in headings), part


def named_paths(text: str) -> set[Path]:
    """Paths a document names: from the project root (configs/..., tests/...), inside the package
    (kl/objective.py), and bare file names in backticks, which must be the project root's
    (`train.py`): a module of the package is named with its layer (`training/updater.py`)."""
    edge = r"(?<![\w./<{-])"
    from_root = re.findall(edge + r"((?:src|tests|benchmarks|configs|docs)/[\w./-]*[\w/])", text)
    in_package = re.findall(edge + r"((?:kl|models|training|runs|reports)/[\w-]+\.py)", text)
    found = {ROOT / p for p in from_root} | {PACKAGE / p for p in in_package}
    bare = set(re.findall(r"`([\w-]+\.py)`", text)) - {"my_rewards.py"}  # the README's example of a user's module
    return found | {ROOT / name for name in bare}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_path_a_document_names_exists(document):
    paths = named_paths(document.read_text(encoding="utf-8"))
    assert paths, "the check found no path at all"
    missing = sorted(str(p.relative_to(ROOT)) for p in paths if not p.exists())
    assert not missing, f"{document.name} names files that do not exist: {missing}"


def test_the_path_check_sees_a_missing_file():
    text = "see `updater.py`, `train.py`, kl/nothing.py and tests/test_nothing.py; `my_rewards.py` is the user's"
    assert {p.name for p in named_paths(text) if not p.exists()} == {"updater.py", "nothing.py", "test_nothing.py"}


def test_the_readme_tree_names_folders_that_exist():
    text = README.read_text(encoding="utf-8")
    tree = text.split("## Where things are", 1)[1].split("\n\n")[1]
    parents: list[tuple[int, Path]] = []
    checked = []
    for line in tree.splitlines():
        indent = len(line) - len(line.lstrip())
        parents = [(i, p) for i, p in parents if i < indent]
        base = parents[-1][1] if parents else ROOT
        for token in line.split():
            if not (token.endswith("/") or re.fullmatch(r"[\w-]+\.\w+", token)):
                break
            path = base / token
            assert path.exists(), f"README's tree names {token}, which is not in {base}"
            checked.append(token)
            if token.endswith("/"):
                parents.append((indent, path))
    for layer in ("kl/", "models/", "training/", "runs/", "reports/", "configs/", "docs/", "tests/", "benchmarks/"):
        assert layer in checked, layer
