"""LoRA with the adapter-off base as reference, exporting a trained policy, and chat templates."""

import csv
import json
import os
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_kl_evaluation, run_script, save_tiny_gpt2
from transformers import AutoModelForCausalLM, AutoTokenizer

from {{ cookiecutter.package_name }}.models.loading import load_causal_lm
from {{ cookiecutter.package_name }}.training.data import PromptDataModule
from {{ cookiecutter.package_name }}.training.module import RBKLModule
from {{ cookiecutter.package_name }}.training.options import Optimization, Sampling
from {{ cookiecutter.package_name }}.training.rewards import KeywordReward

LORA = {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc", "lm_head"]}


def train(tiny_trainer, module, steps: int) -> L.Trainer:
    L.seed_everything(0)
    trainer = tiny_trainer(max_steps=steps, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, PromptDataModule(batch_size=4, epoch_repeats=50))
    return trainer


def logged(trainer, key):
    rows = csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv"))
    return [float(r[key]) for r in rows if r.get(key)]


def test_lora_trains_only_the_adapter_against_its_own_base(tiny_trainer):
    module = RBKLModule(reward=KeywordReward(["good", "great"]), lora=LORA, optimization=Optimization(lr=3e-2))
    assert module.reference is None, "no second copy of the model"
    base = load_causal_lm("builtin:tiny-gpt2").eval()
    trainer = train(tiny_trainer, module, steps=6)

    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    names = [n for n, p in module.policy.named_parameters() if id(p) in optimized]
    assert names and all("lora_" in n for n in names), names[:3]

    ids = torch.randint(0, 100, (3, 7))
    with torch.no_grad(), module.policy.disable_adapter():
        off = module.policy(input_ids=ids).logits
    torch.testing.assert_close(off, base(input_ids=ids).logits, rtol=0, atol=1e-6)
    kl = logged(trainer, "train/kl/rb/mean")
    assert kl[0] < 1e-7 < 1e-4 < kl[-1], "KL 0 at initialisation (B = 0), then it grows"


def test_a_lora_checkpoint_holds_the_adapter_and_resumes_it(tiny_trainer, tmp_path):
    module = RBKLModule(reward=KeywordReward(["good"]), lora=LORA, optimization=Optimization(lr=3e-2))
    trainer = train(tiny_trainer, module, steps=2)
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    state = torch.load(tmp_path / "lora.ckpt", weights_only=False)["state_dict"]
    assert state and all("lora_" in key for key in state), sorted(state)[:3]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = RBKLModule.load_from_checkpoint(tmp_path / "lora.ckpt", reward=None)
    # The base weights are left out on purpose and rebuilt from the config: not "missing".
    assert not [w for w in caught if "not in the checkpoint" in str(w.message)], [str(w.message) for w in caught]
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(restored.policy(input_ids=ids).logits, module.policy(input_ids=ids).logits)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"lora": {"target_modules": ["q_proj"]}},
            r"\['q_proj'\] match no layer of the policy; its linear layers are named c_attn, c_fc, c_proj, lm_head$",
        ),
        (
            # peft alone would adapt c_attn and say nothing of q_proj
            {"lora": {"target_modules": ["c_attn", "q_proj"]}},
            r"\['c_attn', 'q_proj'\]: 'q_proj' matches no layer of the policy \(peft would adapt the others alone\)",
        ),
        ({"lora": {"dropout": 0.1}}, "lora dropout must be 0"),
        ({"lora": {"rank": 4}}, "unknown lora setting"),
    ],
)
def test_bad_lora_settings_are_one_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RBKLModule(**kwargs)


def test_lora_with_a_separate_reference_of_another_vocabulary_is_refused(hf_checkpoints):
    with pytest.raises(ValueError, match="different vocabularies"):
        RBKLModule(policy=str(hf_checkpoints["gpt2"]), reference=str(hf_checkpoints["gpt2_other_vocab"]), lora={"r": 2})


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_export_writes_a_folder_that_from_pretrained_loads(tiny_trainer, tmp_path, lora):
    module = RBKLModule(reward=KeywordReward(["good"]), lora=lora, optimization=Optimization(lr=3e-2))
    trainer = train(tiny_trainer, module, steps=2)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    result = run_script("export.py", str(tmp_path / "run.ckpt"), str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not hasattr(exported, "peft_config"), "a plain model: the adapter is merged"
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(
            exported(input_ids=ids).logits, module.policy(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
    assert AutoTokenizer.from_pretrained(tmp_path / "out").eos_token == module.tokenizer.eos_token
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # safetensors alone would write 0600
    if lora is None:
        return
    # The KL evaluation reads the exported folder like any hub model: trained policy vs its base.
    result = run_kl_evaluation(
        "--model.init_args.policy",
        str(tmp_path / "out"),
        "--model.init_args.reference=builtin:tiny-gpt2",
        "--model.init_args.sampling.test_samples_per_prompt=2",
        "--model.init_args.sampling.max_new_tokens=4",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next((tmp_path / "logs").rglob("kl_report.json")).read_text())
    assert report["policy"] == str(tmp_path / "out") and report["estimators"]["rb"]["mean"] > 0


def test_export_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    result = run_script("export.py", str(tmp_path / "nope.ckpt"), str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope.ckpt'}: no such checkpoint file"


def jinja(text: str) -> str:
    """Jinja with (% %) and (( )) for its delimiters: literal ones would read as leftovers of the
    cookiecutter template to the template's own check."""
    return text.replace("(%", "{" + "%").replace("%)", "%" + "}").replace("((", "{" + "{").replace("))", "}" + "}")


CHAT = jinja(
    "(% for m in messages %)<|user|>(( m['content'] ))(% endfor %)"
    "(% if add_generation_prompt %)<|assistant|>(% endif %)"
)


@pytest.fixture(scope="module")
def instruct_model(tmp_path_factory):
    """A tiny 'instruct' model: a chat template and two stop ids (EOS and <|end|>)."""
    folder = save_tiny_gpt2(tmp_path_factory.mktemp("instruct"), vocab_extra=8)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.chat_template = CHAT
    tokenizer.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    model.generation_config.save_pretrained(folder)
    return folder


def test_chat_template_formats_prompts_and_any_stop_id_ends_a_response(instruct_model, monkeypatch):
    from {{ cookiecutter.package_name }}.models import sampler as sampling

    module = RBKLModule(policy=str(instruct_model), sampling=Sampling(chat_template=True, max_new_tokens=8))
    end = module.tokenizer.convert_tokens_to_ids("<|end|>")
    assert module.stop_ids == sorted([module.tokenizer.eos_token_id, end])
    ids, mask = module.encode_prompts(["the story is", "what a"])
    texts = module.tokenizer.batch_decode([row[m] for row, m in zip(ids, mask, strict=True)])
    assert texts == ["<|user|>the story is<|assistant|>", "<|user|>what a<|assistant|>"]

    # Row 0 draws <|end|> at its third token: the loop stops that row and its mask ends there.
    draw, calls = sampling.sample_token, []

    def planted(logits, generator=None):
        token = draw(logits, generator)
        calls.append(1)
        if len(calls) == 3:
            token[0] = end
        return token

    monkeypatch.setattr(sampling, "sample_token", planted)
    samples = module.rollout(["the story is"], 2).samples
    assert samples.response[0, 2] == end
    assert samples.response_mask[0].tolist()[:4] == [True, True, True, False]
    assert (samples.response[0, 3:] == module.tokenizer.pad_token_id).all()


def test_chat_template_needs_a_tokenizer_that_has_one(hf_checkpoints):
    with pytest.raises(ValueError, match="has no chat template"):
        RBKLModule(policy=str(hf_checkpoints["gpt2"]), sampling=Sampling(chat_template=True))
