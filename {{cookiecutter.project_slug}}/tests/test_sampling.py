"""Traps 1-4 of docs/estimators.md §6: sampling settings, dropout, position ids, EOS masks."""

import pytest
import torch
from torch import nn

from {{ cookiecutter.package_name }}.module import RBKLModule
from {{ cookiecutter.package_name }}.sampling import Samples, response_mask, sampling_config

PROMPTS = ["this movie was", "a", "i loved the music but the"]  # different lengths: left padding


@pytest.fixture(scope="module")
def module(hf_checkpoints):
    return RBKLModule(policy=str(hf_checkpoints["gpt2"]), max_new_tokens=6)


def test_generate_scores_equal_the_training_forward_on_a_left_padded_batch(module):
    ids, mask = module.encode_prompts(PROMPTS)
    assert not mask[:, 0].all(), "the batch must be left-padded for this test to mean anything"
    config = sampling_config(6, module.tokenizer.eos_token_id, module.tokenizer.pad_token_id)
    config.update(return_dict_in_generate=True, output_scores=True, output_logits=True)
    torch.manual_seed(0)
    out = module.policy.generate(input_ids=ids, attention_mask=mask.long(), generation_config=config)
    response = out.sequences[:, ids.shape[1] :]
    samples = Samples(ids, mask, response, response_mask(response, config.eos_token_id))
    raw = torch.stack(out.logits, dim=1)  # [B, R, V] what the model produced while sampling
    processed = torch.stack(out.scores, dim=1)  # after every logits processor
    # Trap 1: with our settings no processor touches the distribution.
    torch.testing.assert_close(processed, raw)
    # Trap 3: the training forward reproduces the sampling logits at every real position.
    logits = module.response_logits(module.policy, samples)
    m = samples.response_mask
    torch.testing.assert_close(logits[m], raw[m], rtol=1e-4, atol=1e-4)
    # Without explicit position ids the left-padded rows are wrong: the check can fail.
    naive = module.policy(input_ids=samples.input_ids, attention_mask=samples.attention_mask.long()).logits
    naive = naive[:, ids.shape[1] - 1 : -1]
    padded_rows = ~mask[:, 0]
    assert not torch.allclose(naive[padded_rows][m[padded_rows]], raw[padded_rows][m[padded_rows]], atol=1e-3)


def test_transformers_default_top_k_would_change_the_scores(module):
    ids, mask = module.encode_prompts(PROMPTS)
    config = sampling_config(3, module.tokenizer.eos_token_id, module.tokenizer.pad_token_id)
    config.update(top_k=5, return_dict_in_generate=True, output_scores=True, output_logits=True)
    out = module.policy.generate(input_ids=ids, attention_mask=mask.long(), generation_config=config)
    assert not torch.equal(torch.stack(out.scores), torch.stack(out.logits))


@pytest.mark.parametrize(
    "setting",
    [
        {"temperature": 0.7},
        {"top_k": 50},
        {"top_p": 0.9},
        {"repetition_penalty": 1.2},
        {"min_new_tokens": 2},
        {"bad_words_ids": [[3]]},
        {"no_repeat_ngram_size": 2},
        {"num_beams": 2},
        {"do_sample": False},
        {"typical_p": 0.5},
    ],
)
def test_distribution_changing_settings_are_refused(setting, hf_checkpoints):
    (key,) = setting
    with pytest.raises(ValueError, match=f"{key}=.*bias every KL estimate"):
        sampling_config(8, 0, 0, **setting)
    with pytest.raises(ValueError, match=key):
        RBKLModule(policy=str(hf_checkpoints["gpt2"]), generation_kwargs=setting)


def test_neutral_and_harmless_settings_are_accepted():
    config = sampling_config(8, 0, 0, top_k=0, temperature=1.0, use_cache=False)
    assert config.top_k == 0 and config.do_sample and config.use_cache is False
    with pytest.raises(ValueError, match="unknown or unsupported generation setting 'foo'"):
        sampling_config(8, 0, 0, foo=1)


def test_response_mask_stops_after_the_first_eos_and_includes_it():
    eos = 7
    response = torch.tensor([[1, 2, eos, eos, eos], [eos, 3, eos, 4, 5], [1, 2, 3, 4, 5]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(response_mask(response, eos), expected)


def test_dropout_is_off_and_models_stay_in_eval_mode(hf_checkpoints):
    module = RBKLModule(policy=str(hf_checkpoints["gpt2_dropout"]))
    assert module.policy.config.resid_pdrop == 0.0
    module.train()
    assert not module.policy.training and not module.reference.training
    assert all(m.p == 0.0 for m in module.modules() if isinstance(m, nn.Dropout))
    ids = torch.tensor([[1, 2, 3, 4]])
    module.policy.train()  # even a model forced into train mode samples deterministically
    torch.testing.assert_close(module.policy(ids).logits, module.policy(ids).logits, rtol=0, atol=0)
