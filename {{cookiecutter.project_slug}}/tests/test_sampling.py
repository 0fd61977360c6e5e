"""Traps 1-4 of docs/estimators.md §6: sampling settings, dropout, position ids, EOS masks."""

import pytest
import torch
from torch import nn

from {{ cookiecutter.package_name }}.models.sampler import Samples, response_mask, sampling_config
from {{ cookiecutter.package_name }}.training.module import RBKLModule
from {{ cookiecutter.package_name }}.training.options import Sampling

PROMPTS = ["this movie was", "a", "i loved the music but the"]  # different lengths: left padding


@pytest.fixture(scope="module")
def module(hf_checkpoints):
    return RBKLModule(policy=str(hf_checkpoints["gpt2"]), sampling=Sampling(max_new_tokens=6))


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
    logits = module.pair.response_logits(module.policy, samples)
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
        RBKLModule(policy=str(hf_checkpoints["gpt2"]), sampling=Sampling(generation_kwargs=setting))


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


# -- the fast sampler: exact by enumeration -------------------------------------------------------

VOCAB, NEW_TOKENS, DRAWS = 6, 3, 12_000
EXACT_PROMPTS = [[3, 1, 4], [5]]  # left-padded to [[3, 1, 4], [pad, pad, 5]]


@pytest.fixture(scope="module")
def tiny_lm():
    from {{ cookiecutter.package_name }}.models.loading import tiny_gpt2

    model = tiny_gpt2(VOCAB, eos_token_id=0, seed=3, n_positions=16).eval()
    # An untied, larger LM head: distributions far from uniform (top response 0.37 and 0.61),
    # with 60-odd responses common enough for the chi-square test.
    head = 0.25 * torch.randn(VOCAB, model.config.n_embd, generator=torch.Generator().manual_seed(0))
    model.lm_head.weight = torch.nn.Parameter(head)
    return model


def exact_response_probabilities(model, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """Every response (ends at EOS = 0 or after NEW_TOKENS tokens) with its probability, by forward passes."""
    probs = {}

    def extend(prefix: tuple[int, ...], logp: float) -> None:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1].double()
        for token, lp in enumerate(torch.log_softmax(logits, -1).tolist()):
            seq = (*prefix, token)
            if token == 0 or len(seq) == NEW_TOKENS:
                probs[seq] = probs.get(seq, 0.0) + float(torch.tensor(logp + lp).exp())
            else:
                extend(seq, logp + lp)

    extend((), 0.0)
    return probs


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    return ids, mask


def chi_square_p(samples, prompt_index: int, exact: dict) -> float:
    from scipy.stats import chisquare

    rows = samples.response[prompt_index * DRAWS : (prompt_index + 1) * DRAWS]
    masks = samples.response_mask[prompt_index * DRAWS : (prompt_index + 1) * DRAWS]
    counts: dict[tuple[int, ...], int] = {}
    for row, m in zip(rows.tolist(), masks.tolist(), strict=True):
        key = tuple(t for t, keep in zip(row, m, strict=False) if keep)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(exact), "a response the model cannot produce"
    # Outcomes expected fewer than 5 times are pooled into one bin, as the test requires.
    common = [k for k, p in exact.items() if p * DRAWS >= 5]
    observed = [counts.get(k, 0) for k in common]
    expected = [exact[k] * DRAWS for k in common]
    rare = DRAWS * (1 - sum(exact[k] for k in common))
    if rare > 1e-6:
        observed.append(DRAWS - sum(observed))
        expected.append(rare)
    return chisquare(observed, expected).pvalue


def draw(sampler: str, model, seed: int):
    from {{ cookiecutter.package_name }}.models.sampler import sample_fast, sample_responses

    ids, mask = left_padded(EXACT_PROMPTS)
    torch.manual_seed(seed)
    if sampler == "fast":
        return sample_fast(model, ids, mask, DRAWS, NEW_TOKENS, [0], 0)
    return sample_responses(model, ids, mask, DRAWS, sampling_config(NEW_TOKENS, 0, 0))


@pytest.mark.parametrize("sampler", ["fast", "hf"])
def test_every_full_response_comes_with_its_exact_probability(tiny_lm, sampler):
    samples = draw(sampler, tiny_lm, seed=0)
    for i, prompt in enumerate(EXACT_PROMPTS):
        exact = exact_response_probabilities(tiny_lm, prompt)
        assert sum(exact.values()) == pytest.approx(1.0, abs=1e-6)  # float32 logits
        assert chi_square_p(samples, i, exact) > 0.001, (sampler, prompt)


def test_the_frequency_check_rejects_a_tempered_sampler(tiny_lm, monkeypatch):
    from {{ cookiecutter.package_name }}.models import sampler as sampling

    exact_draw = sampling.sample_token
    monkeypatch.setattr(sampling, "sample_token", lambda logits, generator=None: exact_draw(logits / 0.8, generator))
    samples = draw("fast", tiny_lm, seed=0)
    assert chi_square_p(samples, 0, exact_response_probabilities(tiny_lm, EXACT_PROMPTS[0])) < 0.001


def test_fast_sampler_logits_equal_the_training_forward_on_a_left_padded_batch(module):
    from {{ cookiecutter.package_name }}.models.sampler import sample_fast

    ids, mask = module.encode_prompts(PROMPTS)
    assert not mask[:, 0].all()
    torch.manual_seed(0)
    samples, drawn_from = sample_fast(
        module.policy, ids, mask, 2, 6, module.stop_ids, module.tokenizer.pad_token_id, return_logits=True
    )
    logits = module.pair.response_logits(module.policy, samples)
    m = samples.response_mask
    torch.testing.assert_close(logits[m], drawn_from[m], rtol=1e-4, atol=1e-4)


def test_responses_stop_at_any_stop_id():
    response = torch.tensor([[5, 9, 4, 4], [4, 2, 9, 1], [1, 2, 3, 4]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(response_mask(response, [9, 4]), expected)


def test_a_static_cache_draws_every_response_with_its_exact_probability(tiny_lm):
    from {{ cookiecutter.package_name }}.models.sampler import sample_fast, static_cache

    ids, mask = left_padded(EXACT_PROMPTS)
    torch.manual_seed(0)
    cache = static_cache(tiny_lm, ids.shape[1] + NEW_TOKENS, bucket=4)
    samples = sample_fast(tiny_lm, ids, mask, DRAWS, NEW_TOKENS, [0], 0, cache=cache)
    for i, prompt in enumerate(EXACT_PROMPTS):
        assert chi_square_p(samples, i, exact_response_probabilities(tiny_lm, prompt)) > 0.001, prompt


@pytest.mark.parametrize("compiled", [False, True], ids=["static", "static-compiled"])
def test_static_cache_logits_equal_the_training_forward_batch_after_batch(compiled):
    from {{ cookiecutter.package_name }}.models.sampler import sample_fast

    module = RBKLModule(sampling=Sampling(max_new_tokens=6, decode_cache="static"))
    # The eager backend checks what torch.compile traces, without a C++ toolchain or a GPU.
    decode = torch.compile(module.policy.forward, backend="eager", dynamic=False) if compiled else None
    caches = []
    for prompts in (PROMPTS, PROMPTS[::-1]):  # the second batch resets and reuses the first one's cache
        ids, mask = module.encode_prompts(prompts)
        caches.append(module.sampler.static_cache(2 * len(prompts), ids.shape[1] + 6, module.device))
        torch.manual_seed(0)
        samples, drawn_from = sample_fast(
            module.policy,
            ids,
            mask,
            2,
            6,
            module.stop_ids,
            module.tokenizer.pad_token_id,
            return_logits=True,
            cache=caches[-1],
            decode=decode,
        )
        logits = module.pair.response_logits(module.policy, samples)
        m = samples.response_mask
        torch.testing.assert_close(logits[m], drawn_from[m], rtol=1e-4, atol=1e-4)
    assert caches[0] is caches[1]
    assert module.rollout(PROMPTS, 2).samples.response.shape == (6, 6)  # the module's own path


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"compile_decode": True}, "compile_decode needs decode_cache: static"),
        ({"sampler": "hf", "decode_cache": "static"}, "sampler hf uses generate's own"),
    ],
)
def test_decode_options_that_cannot_work_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RBKLModule(sampling=Sampling(**kwargs))
