"""Mistakes that trained silently or said too little: each now ends in one line naming what is wrong and the fix.

A reference whose tokenizer gives the ids other words, an export into a folder that holds files,
LoRA target modules that match in part, a reward returning the wrong number of values, an
accelerator the machine lacks, a finished run resumed, a resume that changes the objective, a test
of a checkpoint, and Lightning's advice that does not apply here.
"""

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_script, save_tiny_causal_lm
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from {{ cookiecutter.package_name }}.models.loading import load_causal_lm, vocabulary_differences
from {{ cookiecutter.package_name }}.models.pair import ModelPair
from {{ cookiecutter.package_name }}.models.vocabulary import builtin_tokenizer
from {{ cookiecutter.package_name }}.runs import cli, export

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


# -- the machine, the run's end, its objective, its test -------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
@pytest.mark.parametrize(
    "accelerator, sentence",
    [
        ("gpu", "trainer.accelerator=gpu: no GPU is visible on this machine; use cpu or auto"),
        ("cuda", "trainer.accelerator=cuda: no CUDA device is visible on this machine; use cpu or auto"),
    ],
)
def test_an_accelerator_the_machine_lacks_is_refused_in_one_line(tmp_path, accelerator, sentence):
    args = ["fit", "--config", DEFAULT, f"--trainer.accelerator={accelerator}", *QUICK]
    last, stderr = last_line("train.py", *args, cwd=tmp_path)
    assert last == f"error: {sentence}", stderr[-3000:]


# One epoch of two batches, validated on one: a run that finishes in seconds.
SHORT = [
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--model.init_args.sampling.val_samples_per_prompt=2",
    "--trainer.enable_progress_bar=false",
]


def train(cwd: Path, *args: str):
    result = run_script("train.py", "fit", "--config", DEFAULT, *SHORT, *args, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A folder whose logs/default/version_0 trained to max_epochs=1 (2 steps); tests take copies."""
    root = tmp_path_factory.mktemp("finished")
    train(root, "--trainer.max_epochs=1")
    return root


def copy_of(finished_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(a copy of the finished run's folder, the run folder in it)."""
    shutil.copytree(finished_run, tmp_path / "copy")
    return tmp_path / "copy", tmp_path / "copy" / "logs" / "default" / "version_0"


def test_resuming_a_finished_run_says_there_is_nothing_left_to_train(tmp_path, finished_run):
    cwd, run = copy_of(finished_run, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    checkpoint = "logs/default/version_0/checkpoints/last.ckpt"
    result = run_script(
        "train.py", "fit", "--config", DEFAULT, *SHORT, "--trainer.max_epochs=1", "--ckpt_path", checkpoint, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"nothing left to train: {checkpoint} finished epoch 1 of max_epochs=1; raise --trainer.max_epochs to train on"
    ), result.stderr[-3000:]
    assert sorted(p.name for p in run.iterdir()) == before, "nothing written: no config, no rows dropped"
    steps = ["--trainer.max_epochs=5", "--trainer.max_steps=2", "--ckpt_path", checkpoint]
    result = run_script("train.py", "fit", "--config", DEFAULT, *SHORT, *steps, cwd=cwd)
    assert result.stderr.strip().splitlines()[-1] == (
        f"nothing left to train: {checkpoint} finished step 2 of max_steps=2; raise --trainer.max_steps to train on"
    ), result.stderr[-3000:]


def test_a_resume_that_changes_the_objective_says_so_last_records_it_and_compare_runs_labels_it(
    tmp_path, finished_run, capsys
):
    cwd, run = copy_of(finished_run, tmp_path)
    checkpoint = "logs/default/version_0/checkpoints/last.ckpt"
    shutil.copy(cwd / checkpoint, tmp_path / "step2.ckpt")
    resumed = train(cwd, "--trainer.max_epochs=2", "--ckpt_path", checkpoint, "--model.init_args.objective.beta=0.5")
    assert resumed.stderr.strip().splitlines()[-1] == (
        "warning: resumed at step 2 with settings that change the objective (objective.beta: 0.05 -> 0.5): the "
        "steps before it trained another objective; recorded in logs/default/version_0/objective_changes.yaml, "
        "and compare-runs labels the run mixed"
    ), resumed.stderr[-3000:]
    assert resumed.stderr.count("change the objective") == 1, "said once, at the end"
    changes = yaml.safe_load((run / "objective_changes.yaml").read_text())
    assert changes == [{"from_step": 2, "changes": {"objective.beta": {"before": 0.05, "after": 0.5}}}]

    from {{ cookiecutter.package_name }}.reports.compare_runs import main as compare_runs

    compare_runs([str(run), "--output", str(tmp_path / "comparison")])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"warning: {run} changed its objective when resumed (objective.beta 0.05 -> 0.5 at step 2; "
        "objective_changes.yaml): its point mixes objectives, labelled 'beta=0.05->0.5 (mixed)'"
    )
    (point,) = json.loads((tmp_path / "comparison" / "pareto.json").read_text())["runs"]
    assert point["label"] == "beta=0.05->0.5 (mixed)"

    # Resumed again from the same checkpoint with the first beta: the change is gone with the steps it trained.
    shutil.copy(tmp_path / "step2.ckpt", cwd / checkpoint)
    again = train(cwd, "--trainer.max_epochs=2", "--ckpt_path", checkpoint)
    assert "change the objective" not in again.stderr
    assert not (run / "objective_changes.yaml").exists()


def test_a_test_of_a_checkpoint_reports_into_its_run_and_names_it(tmp_path, finished_run):
    cwd, run = copy_of(finished_run, tmp_path)
    hparams = (run / "hparams.yaml").read_text()
    checkpoint = "logs/default/version_0/checkpoints/last.ckpt"
    result = run_script("train.py", "test", "--ckpt_path", checkpoint, "--trainer.enable_progress_bar=false", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    header = next(line for line in result.stdout.splitlines() if line.startswith("KL( "))
    assert header.startswith(f"KL( {checkpoint} (trained from builtin:tiny-gpt2) || builtin:tiny-gpt2 ) on 8 prompts")
    assert result.stdout.strip().splitlines()[-1] == (
        "wrote logs/default/version_0/kl_report.json, kl_report.md and kl_precision.png"
    )
    assert sorted(p.name for p in (cwd / "logs" / "default").iterdir()) == ["version_0"], "no new run folder"
    assert (run / "config.test-at-step-2.yaml").is_file() and (run / "hparams.yaml").read_text() == hparams
    assert "dirpath has changed" not in result.stderr


def test_a_test_of_a_checkpoint_draws_from_the_seed_given_now(tmp_path, finished_run):
    """A resumed fit continues the checkpoint's draws (test_resume.py); an evaluation repeated with
    another --seed_everything must see fresh samples, and the same seed the same ones."""
    cwd, run = copy_of(finished_run, tmp_path)
    checkpoint = "logs/default/version_0/checkpoints/last.ckpt"

    def report(seed: int) -> dict:
        argv = ("test", "--ckpt_path", checkpoint, f"--seed_everything={seed}", "--trainer.enable_progress_bar=false")
        result = run_script("train.py", *argv, cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((run / "kl_report.json").read_text())["estimators"]

    first, again, other = report(1), report(1), report(2)
    assert first == again
    assert all(first[name]["mean"] != other[name]["mean"] for name in ("mc", "rb"))


def test_kl_by_samples_repeats_the_test_on_a_copy_of_the_checkpoint(tmp_path, finished_run):
    """benchmarks/kl_by_samples.py as a user runs it: fresh samples per repeat, the source run untouched."""
    cwd, run = copy_of(finished_run, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    argv = ("logs/default/version_0/checkpoints/last.ckpt", "--samples", "2", "--repeats", "2", "--output", "table")
    result = run_script("benchmarks/kl_by_samples.py", *argv, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((cwd / "table" / f"M2_seed{seed}.json").read_text())["estimators"] for seed in (0, 1)]
    assert reports[0]["rb"]["mean"] != reports[1]["rb"]["mean"], "each repeat draws fresh samples"
    rows = json.loads((cwd / "table" / "table.json").read_text())["rows"]
    assert [(r["estimator"], r["samples"]) for r in rows] == [("mc", 1), ("mc", 2), ("rb", 1), ("rb", 2)]
    assert rows[3]["mean"] == pytest.approx((reports[0]["rb"]["mean"] + reports[1]["rb"]["mean"]) / 2)
    assert sorted(p.name for p in run.iterdir()) == before, "the run the checkpoint came from is left as it was"


def test_a_resumed_fit_keeps_the_checkpoint_s_seed_and_a_test_takes_the_one_given_now(tiny_trainer, tmp_path):
    from {{ cookiecutter.package_name }}.training.data import PromptDataModule
    from {{ cookiecutter.package_name }}.training.module import RBKLModule
    from {{ cookiecutter.package_name }}.training.options import Sampling

    def module(seed: int) -> RBKLModule:
        torch.manual_seed(seed)  # what seed_everything does before LightningCLI builds the module
        return RBKLModule(sampling=Sampling(max_new_tokens=2, val_samples_per_prompt=2, test_samples_per_prompt=2))

    data = PromptDataModule(batch_size=2, epoch_repeats=1)
    trained = module(5)
    tiny_trainer(max_steps=1, limit_val_batches=0).fit(trained, data)
    checkpoint = tmp_path / "step1.ckpt"
    trained.trainer.save_checkpoint(checkpoint)
    resumed = module(7)
    tiny_trainer(max_steps=2, limit_val_batches=0).fit(resumed, data, ckpt_path=checkpoint)
    assert resumed.run_seed == 5, "a resumed fit continues the checkpoint's draws"
    tested = module(7)
    tiny_trainer(limit_test_batches=1).test(tested, data, ckpt_path=checkpoint)
    assert tested.run_seed == 7, "a test draws from the seed given now"


def test_lightning_advice_that_does_not_apply_here_is_silenced_and_nothing_else():
    """Under DDP Lightning advises sync_dist for every value logged per epoch (tests/test_ddp.py checks
    the real run); the module's values are merged exactly by their torchmetrics states."""
    advice = (
        "It is recommended to use `self.log('val/kl/rb/mean', ..., sync_dist=True)` when logging on epoch level "
        "in distributed setting to accumulate the metric across devices."
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli._quiet()
        warnings.warn(advice, PossibleUserWarning, stacklevel=1)
        warnings.warn("The 'train_dataloader' does not have many workers", PossibleUserWarning, stacklevel=1)
        warnings.warn(advice, UserWarning, stacklevel=1)  # not Lightning's category: not its advice
    assert [str(w.message)[:15] for w in caught] == ["The 'train_data", advice[:15]]
    note = logging.makeLogRecord({"msg": "`weights_only` was not set, defaulting to `False`."})
    assert not cli._DropTips().filter(note)
    assert cli._DropTips().filter(logging.makeLogRecord({"msg": "`weights_only` was set to True"}))
