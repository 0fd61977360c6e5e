"""Sampling responses from the policy exactly as the KL estimators assume (docs/estimators.md §6).

Every estimator assumes y ~ p, the policy's own distribution. Any logits processor (temperature,
top-k, top-p, repetition penalty, a minimum length, banned words...) samples from another
distribution and biases every estimate, so `sampling_config` builds a GenerationConfig with all
of them neutral and refuses overrides that are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, PreTrainedModel

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


def sampling_config(max_new_tokens: int, eos_token_id: int, pad_token_id: int, **overrides) -> GenerationConfig:
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


def response_mask(response: Tensor, eos_token_id: int) -> Tensor:
    """[B, R] bool: True up to and including the first EOS, False after it.

    Built from the first EOS, never from `token == pad`: GPT-2 pads with its EOS token.
    """
    is_eos = response == eos_token_id
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before t
    return eos_before == 0


@dataclass
class Samples:
    """k responses per prompt, grouped: rows [i*k, (i+1)*k) belong to prompt i."""

    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P] bool
    response: Tensor  # [N, R]
    response_mask: Tensor  # [N, R] bool, includes the EOS

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
