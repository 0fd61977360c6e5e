"""Sampling responses from the policy exactly as the KL estimators assume (docs/estimators.md §6).

Every estimator assumes y ~ p, the policy's own distribution. Any logits processor (temperature,
top-k, top-p, repetition penalty, a minimum length, banned words...) samples from another
distribution and biases every estimate, so `sampling_config` builds a GenerationConfig with all
of them neutral and refuses overrides that are not.

Two samplers draw from it. `sample_responses` ("hf") calls Hugging Face `generate`.
`sample_fast` ("fast", the default) is a plain decode loop over the model's KV cache: prefill
the left-padded prompts once, then one token per step with the position ids and attention mask
generate would use, and each token drawn exactly by inverting the cumulative distribution in
float64 (one uniform per row). `generate` samples with `torch.multinomial`, which draws an
exponential per vocabulary entry: on a CPU that was 900 of 1100 ms of a step's sampling at a
50k vocabulary, where the inverse CDF costs about a softmax.

On a GPU, small models decode at the speed of Python, not of the device. `sample_fast` can
fill a preallocated static cache instead (every decode step then has the same shapes: the
attention mask is allocated at the cache's full length, zeros ahead) and run its decode steps
through a compiled forward (`torch.compile`; CUDA graphs on a GPU). Both are off by default.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import Cache, GenerationConfig, PreTrainedModel, StaticCache

from .loading import unwrap_peft

# Generation settings and the value that leaves the policy's distribution untouched.
NEUTRAL_SETTINGS = {
    "do_sample": True,
    "temperature": 1.0,
    "top_k": 0,  # transformers' default is 50
    "top_p": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "num_beams": 1,
    "guidance_scale": None,
}
# Settings that change how, not what, is sampled.
ALLOWED_SETTINGS = {"use_cache", "synced_gpus", "cache_implementation"}


def sampling_config(
    max_new_tokens: int, eos_token_id: int | list[int], pad_token_id: int, **overrides
) -> GenerationConfig:
    """A GenerationConfig that samples from the policy itself; refuses distribution-changing overrides."""
    for key, value in overrides.items():
        if key in NEUTRAL_SETTINGS:
            if value != NEUTRAL_SETTINGS[key] and not (key == "top_k" and value is None):
                raise ValueError(
                    f"generation setting {key}={value!r} would sample from a distribution other than "
                    f"the policy and bias every KL estimate; it must be {NEUTRAL_SETTINGS[key]!r}"
                )
        elif key not in ALLOWED_SETTINGS:
            raise ValueError(
                f"unknown or unsupported generation setting {key!r}; allowed overrides are "
                f"{', '.join(sorted(ALLOWED_SETTINGS | NEUTRAL_SETTINGS.keys()))}"
            )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    settings = {k: v for k, v in NEUTRAL_SETTINGS.items() if v is not None}
    settings.update({k: v for k, v in overrides.items() if k in ALLOWED_SETTINGS})
    return GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **settings
    )


def position_ids(attention_mask: Tensor) -> Tensor:
    """Position ids of a left-padded batch, as generate computes them: the first real token is 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]


def response_mask(response: Tensor, eos_token_id: int | Sequence[int]) -> Tensor:
    """[B, R] bool: True up to and including the first stop token, False after it.

    Built from the first stop token (EOS, or any of an instruct model's stop ids), never from
    `token == pad`: GPT-2 pads with its EOS token.
    """
    is_eos = torch.isin(response, torch.as_tensor(eos_token_id, device=response.device))
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before t
    return eos_before == 0


@dataclass
class Samples:
    """k responses per prompt, grouped: rows [i*k, (i+1)*k) belong to prompt i."""

    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P] bool
    response: Tensor  # [N, R]
    response_mask: Tensor  # [N, R] bool, includes the EOS
    # An inference engine's (vllm_engine.py) log-probs of the tokens it drew, 0 on padding, and
    # the seconds its weight sync took before drawing them; None from the hf engine's samplers.
    engine_logp: Tensor | None = None  # [N, R]
    sync_seconds: float | None = None

    def select(self, rows: Tensor) -> Samples:
        """The samples at `rows` (e.g. whole prompt groups for a minibatch)."""
        engine_logp = None if self.engine_logp is None else self.engine_logp[rows]
        return Samples(
            self.prompt_ids[rows],
            self.prompt_mask[rows],
            self.response[rows],
            self.response_mask[rows],
            engine_logp,
            self.sync_seconds,
        )

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response], dim=1)  # [N, P + R]

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)  # [N, P + R]


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    samples_per_prompt: int,
    config: GenerationConfig,
    synced_gpus: bool = False,
) -> Samples:
    """Draw `samples_per_prompt` responses for each prompt; the k samples of a prompt stay adjacent."""
    prompt_ids = prompt_ids.repeat_interleave(samples_per_prompt, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(samples_per_prompt, dim=0)
    out = model.generate(
        input_ids=prompt_ids,
        # generate derives position ids from the mask exactly as `position_ids` does; the
        # training forward must pass them explicitly (tests/test_sampling.py checks both agree).
        attention_mask=prompt_mask.long(),
        generation_config=config,
        synced_gpus=synced_gpus,
    )
    response = out[:, prompt_ids.shape[1] :]
    return Samples(prompt_ids, prompt_mask.bool(), response, response_mask(response, config.eos_token_id))


def sample_token(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """[N, V] logits -> [N] token ids, each drawn exactly from softmax(logits) (inverse CDF, float64)."""
    cdf = torch.softmax(logits.double(), dim=-1).cumsum_(-1)  # [N, V]
    u = torch.rand(logits.shape[0], 1, dtype=torch.float64, device=logits.device, generator=generator)
    # Scaling by the last value keeps the draw exact when rounding left the total at 1 - 1e-16.
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=logits.shape[-1] - 1).squeeze(-1)


def static_cache(model: PreTrainedModel, length: int, bucket: int = 64) -> StaticCache:
    """An empty static KV cache of at least `length` positions, rounded up to a multiple of `bucket`
    so that batches of slightly different prompt lengths share one compiled decode step."""
    return StaticCache(config=unwrap_peft(model).config, max_cache_len=-(-length // bucket) * bucket)


def _cache_length(cache: Cache) -> int:
    # transformers 5 renamed get_max_cache_shape to get_max_length.
    return cache.get_max_length() if hasattr(cache, "get_max_length") else cache.get_max_cache_shape()


@functools.cache
def _cache_argument(model_class: type) -> str:
    """The forward's name for the KV cache: transformers renamed past_key_values to cache (5.x).
    Asked once per class: a signature costs more than a decode step's own Python."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _all_ranks_done(done: Tensor, synced: bool) -> bool:
    if not synced:
        return bool(done.all())
    # Sharded weights are gathered in every forward: a rank that stopped early would leave the
    # others waiting, so every rank steps until all are done.
    pending = (~done).any().to(torch.int64).reshape(1)
    torch.distributed.all_reduce(pending)
    return int(pending) == 0


def _attention_buffer(mask: Tensor, cache: Cache | None, max_new_tokens: int) -> Tensor:
    """[N, W] long: the prompt mask, zeros after it. A preallocated cache gets a mask of its full
    length, so every decode step has the same shapes; a dynamic one a mask that grows."""
    n, prompt_len = mask.shape
    width = prompt_len if cache is None else _cache_length(cache)
    if cache is not None and width < prompt_len + max_new_tokens:
        raise ValueError(f"the cache holds {width} positions; prompts and responses need {prompt_len + max_new_tokens}")
    attention = torch.zeros(n, width, dtype=torch.long, device=mask.device)
    attention[:, :prompt_len] = mask
    return attention


@torch.no_grad()
def sample_fast(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    samples_per_prompt: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_token_id: int,
    synced_gpus: bool = False,
    return_logits: bool = False,
    cache: Cache | None = None,
    decode: Callable[..., Any] | None = None,
) -> Samples | tuple[Samples, Tensor]:
    """Draw `samples_per_prompt` responses per prompt with a KV-cache decode loop (adjacent per prompt).

    With `return_logits`, also the [N, R, V] logits each token was drawn from. `cache`: an empty
    preallocated cache (`static_cache`) of at least P + max_new_tokens positions; None: the
    model's dynamic cache. `decode`: what runs the decode steps (e.g. a compiled
    `model.forward`); default: the model.
    """
    ids = prompt_ids.repeat_interleave(samples_per_prompt, dim=0)  # [N, P]
    mask = prompt_mask.repeat_interleave(samples_per_prompt, dim=0).bool()  # [N, P]
    n, prompt_len = ids.shape
    positions = position_ids(mask.long())  # [N, P], as generate derives them
    stops = torch.as_tensor(list(stop_ids), device=ids.device)
    cache_key = _cache_argument(type(unwrap_peft(model)))
    attention = _attention_buffer(mask, cache, max_new_tokens)
    out = model(
        input_ids=ids,
        attention_mask=attention[:, :prompt_len],
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **({} if cache is None else {cache_key: cache}),
    )
    cache, logits = out[cache_key], out.logits[:, -1]  # [N, V]
    decode = decode or model
    next_position = positions[:, -1:] + 1  # [N, 1]
    tokens, drawn_from = [], []
    done = torch.zeros(n, dtype=torch.bool, device=ids.device)
    check_every = 1 if ids.device.type == "cpu" else 8
    for step in range(max_new_tokens):
        if return_logits:
            drawn_from.append(logits.float())
        token = sample_token(logits).masked_fill_(done, pad_token_id)  # [N]
        tokens.append(token)
        done |= torch.isin(token, stops)
        # Asking whether all rows are done costs a host sync: every step on a CPU (free), every
        # 8th on an accelerator, where a few extra steps on finished rows cost less than a stall.
        if step == max_new_tokens - 1 or (step % check_every == check_every - 1 and _all_ranks_done(done, synced_gpus)):
            break
        if attention.shape[1] == prompt_len + step:  # a dynamic cache: the mask grows with it
            attention = torch.cat([attention, attention.new_zeros(n, 1)], dim=1)
        attention[:, prompt_len + step] = 1
        out = decode(
            input_ids=token[:, None],
            attention_mask=attention,
            position_ids=next_position,
            use_cache=True,
            **{cache_key: cache},
        )
        cache, logits = out[cache_key], out.logits[:, -1]
        next_position = next_position + 1
    response = torch.stack(tokens, dim=1)  # [N, R]
    samples = Samples(ids, mask, response, response_mask(response, list(stop_ids)))
    return (samples, torch.stack(drawn_from, dim=1)) if return_logits else samples
