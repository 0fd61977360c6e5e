"""Mistakes that trained silently or said too little: each now ends in one line naming what is wrong and the fix.

A reference whose tokenizer gives the ids other words, an export into a folder that holds files,
LoRA target modules that match in part, a reward returning the wrong number of values.
"""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_script, save_tiny_causal_lm
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from {{ cookiecutter.package_name }}.models.loading import load_causal_lm, vocabulary_differences
from {{ cookiecutter.package_name }}.models.pair import ModelPair
from {{ cookiecutter.package_name }}.models.vocabulary import builtin_tokenizer
from {{ cookiecutter.package_name }}.runs import export

PROJECT = Path(__file__).resolve().parents[1]
DEFAULT = str(PROJECT / "configs/default.yaml")
QUICK = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"]


def last_line(script: str, *args: str, cwd: Path) -> tuple[str, str]:
    result = run_script(script, *args, cwd=cwd, timeout=300)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1], result.stderr


def shuffled_builtin_tokenizer() -> PreTrainedTokenizerFast:
    """The built-in vocabulary, its words at other ids (EOS and UNK kept): the same size, other meanings."""
    spec = builtin_tokenizer().backend_tokenizer.to_str()
    tokenizer = Tokenizer.from_str(spec)
    vocab = tokenizer.get_vocab()
    words = sorted((w for w in vocab if w not in ("<eos>", "<unk>")), key=vocab.__getitem__)
    reordered = {"<eos>": 0, "<unk>": 1, **{w: 2 + i for i, w in enumerate(reversed(words))}}
    model = tokenizer.model.__class__(reordered, unk_token="<unk>")
    tokenizer.model = model
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """Tiny GPT-2 references of the built-in vocabulary's size: with its tokenizer, with the words
    at other ids, and with no tokenizer at all."""
    root = tmp_path_factory.mktemp("references")
    folders = {name: save_tiny_causal_lm(root / name, "gpt2", seed=1) for name in ("same", "shuffled", "none")}
    builtin_tokenizer().save_pretrained(folders["same"])
    shuffled_builtin_tokenizer().save_pretrained(folders["shuffled"])
    return folders


def test_the_shuffled_reference_tokenizer_loads_as_saved(references):
    tokenizer = AutoTokenizer.from_pretrained(references["shuffled"])
    assert len(tokenizer) == len(builtin_tokenizer()) and tokenizer.get_vocab()["<eos>"] == 0
    assert tokenizer.get_vocab() == shuffled_builtin_tokenizer().get_vocab()


def test_a_reference_tokenizer_with_other_ids_is_refused_in_one_line(tmp_path, references):
    reference = str(references["shuffled"])
    args = ["fit", "--config", DEFAULT, f"--model.init_args.reference={reference}", *QUICK]
    last, stderr = last_line("train.py", *args, cwd=tmp_path)
    assert last == (
        f"error: the tokenizers of the policy (builtin:tiny-gpt2) and the reference ({reference}) differ: "
        "188 of 191 tokens map to other ids (e.g. 'the': 2 for the policy, 190 for the reference); "
        "KL(policy || reference) compares the two models id by id, so set model.init_args.reference to a model "
        "that uses the policy's tokenizer"
    ), stderr[-3000:]


@pytest.mark.parametrize("reference", ["same", "none"])
def test_a_reference_of_the_same_tokenizer_or_none_loads(references, reference):
    """The same vocabulary passes; a reference folder without a tokenizer is trusted, as before."""
    pair = ModelPair.load("builtin:tiny-gpt2", str(references[reference]))
    assert pair.reference is not None


def test_vocabulary_differences_name_missing_and_special_tokens():
    policy, reference = builtin_tokenizer(), builtin_tokenizer()
    assert vocabulary_differences(policy, reference) == []
    reference.add_special_tokens({"additional_special_tokens": ["<|user|>"]})
    assert vocabulary_differences(policy, reference) == [
        "1 of the reference's tokens are not in the policy's (e.g. '<|user|>')"
    ]
    policy.add_tokens(["<|user|>"])  # the same id, but plain text to the policy
    assert vocabulary_differences(policy, reference) == ["1 token(s) are special to only one of them (e.g. '<|user|>')"]


# -- export -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """What export reads of an RBKLModule checkpoint: the hyperparameters and the policy's weights."""
    policy = load_causal_lm("builtin:tiny-gpt2:seed=2")
    path = tmp_path_factory.mktemp("checkpoint") / "run.ckpt"
    state = {f"policy.{name}": value for name, value in policy.state_dict().items()}
    torch.save({"hyper_parameters": {"policy": "builtin:tiny-gpt2"}, "state_dict": state}, path)
    return path


def fresh_export_files(checkpoint: Path, folder: Path) -> set[str]:
    export.export(checkpoint, folder)
    return {p.name for p in folder.iterdir()}


def test_export_into_a_folder_with_files_is_refused_in_one_line(tmp_path, checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    last, stderr = last_line("export.py", str(checkpoint), str(out), cwd=tmp_path)
    assert last == (
        f"error: {out} is not empty (adapter_config.json) and the export's files would mix with them: name a new "
        "folder, or pass --replace to replace this one with the export"
    ), stderr
    assert [p.name for p in out.iterdir()] == ["adapter_config.json"]


def test_export_replace_leaves_nothing_of_the_earlier_export(tmp_path, checkpoint):
    expected = fresh_export_files(checkpoint, tmp_path / "fresh")
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text('{"peft_type": "LORA"}')  # a stale adapter breaks from_pretrained
    (out / "config.json").write_text("{}")
    export.main([str(checkpoint), str(out), "--replace"])
    assert {p.name for p in out.iterdir()} == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out"], "no temporary folder left beside"
    AutoModelForCausalLM.from_pretrained(out)


def test_export_into_an_empty_or_new_folder_needs_no_flag(tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    export.main([str(checkpoint), str(tmp_path / "empty")])
    export.main([str(checkpoint), str(tmp_path / "new" / "deeper")])
    assert (tmp_path / "empty" / "config.json").is_file() and (tmp_path / "new/deeper/config.json").is_file()


def test_export_replace_deletes_no_folder_that_is_not_an_export(tmp_path, checkpoint):
    (tmp_path / "project" / "src").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"--replace would delete .*project, which holds folders \(src\)"):
        export.export(checkpoint, tmp_path / "project", replace=True)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoint, run / "last.ckpt")
    with pytest.raises(ValueError, match="holds the checkpoint .*last.ckpt and is no earlier export"):
        export.export(run / "last.ckpt", run, replace=True)


def test_a_failed_export_leaves_the_earlier_one_as_it_was(tmp_path, checkpoint, monkeypatch):
    out = tmp_path / "out"
    before = fresh_export_files(checkpoint, out)

    def full_disk(folder):
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "follow_umask", full_disk)
    with pytest.raises(OSError, match="No space"):
        export.export(checkpoint, out, replace=True)
    assert {p.name for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "the half-written folder is gone"


# -- LoRA and rewards through train.py -----------------------------------------------------------------


def test_lora_target_modules_that_match_in_part_are_refused_in_one_line(tmp_path):
    llama = save_tiny_causal_lm(tmp_path / "llama", "llama")
    args = [
        "fit",
        "--config",
        DEFAULT,
        f"--model.init_args.policy={llama}",
        "--model.init_args.tokenizer=builtin:tiny-gpt2",
    ]
    args += ["--model.init_args.lora.target_modules=[q_proj,nonexistent_proj]", *QUICK]
    last, stderr = last_line("train.py", *args, cwd=tmp_path)
    assert last == (
        "error: lora target_modules ['q_proj', 'nonexistent_proj']: 'nonexistent_proj' matches no layer of the "
        "policy (peft would adapt the others alone); its linear layers are named down_proj, gate_proj, k_proj, "
        "lm_head, o_proj, q_proj, up_proj, v_proj"
    ), stderr[-3000:]


def test_a_reward_of_the_wrong_length_names_itself_and_the_numbers_set(tmp_path):
    shutil.copy(PROJECT / "train.py", tmp_path)
    (tmp_path / "my_rewards.py").write_text(
        "def one_short(prompts, completions, **kwargs):\n    return [1.0] * (len(completions) - 1)\n"
    )
    args = ["fit", "--config", DEFAULT, "--model.init_args.reward=my_rewards.one_short", *QUICK]
    last, stderr = last_line(str(tmp_path / "train.py"), *args, cwd=tmp_path)
    assert last == (
        "error: reward one_short returned 31 values for 32 responses (8 prompts x 4 samples per prompt: "
        "sampling.samples_per_prompt when training, val_samples_per_prompt or test_samples_per_prompt when "
        "evaluating); a reward returns one value per response, in their order"
    ), stderr[-3000:]
