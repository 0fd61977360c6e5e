"""The rollout: prompts -> token ids -> k responses each from the policy -> decoded text -> rewards.

Everything here happens once per batch, at the weights that sample; nothing in a `Rollout`
depends on the weights after sampling. The module composes the three parts (`PromptEncoder`,
`ResponseSampler`, `score_responses`) in `RBKLModule.rollout`, and a subclass overrides
`encode_prompts` or `score` there. The dataset's other columns travel with their prompts: into
the reward functions (repeated per response, with `completion_ids`) and into the `Rollout`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ..models.sampler import Samples, sample_fast, sample_responses, sampling_config, static_cache
from ..models.vllm_engine import VLLMSampler
from .data import Columns, PromptBatch, RepeatedPrompts, prompt_text
from .options import Sampling
from .rewards import Reward, Scores, WeightedRewards, call_reward, check_rewards, reward_name


@dataclass
class Rollout:
    """Sampled and scored once per batch: nothing here depends on the weights after sampling."""

    prompts: list  # n distinct prompts (strings, or lists of messages)
    samples: Samples  # n * group_size responses, the group_size samples of a prompt adjacent
    rewards: Tensor  # [n * group_size], the weighted total of a list of rewards
    group_size: int
    responses: list[str] | None = None  # the decoded texts the rewards were computed on
    columns: Columns = field(default_factory=dict)  # the dataset's other columns, n values each
    by_reward: dict[str, Tensor] = field(default_factory=dict)  # a list's rewards: name -> [n * group_size]

    @classmethod
    def scored(
        cls, batch: PromptBatch, samples: Samples, scores: Tensor | Scores, k: int, responses: list[str]
    ) -> Rollout:
        """A sampled batch with its rewards: a Tensor [N], or a list's Scores (total and each reward's)."""
        total, by_reward = (scores.total, scores.by_reward) if isinstance(scores, Scores) else (scores, {})
        return cls(batch.prompts, samples, total, k, responses, batch.columns, by_reward)

    def rows(self, prompts: Tensor) -> Tensor:
        """Sample rows of the prompts at indices `prompts`: their whole groups, on the rewards' device."""
        k = self.group_size
        return (prompts[:, None] * k + torch.arange(k, device=prompts.device)).flatten().to(self.rewards.device)

    def select(self, prompts: Tensor) -> Rollout:
        """The whole groups of the prompts at indices `prompts` (a minibatch never splits a group)."""
        rows = self.rows(prompts)
        responses = None if self.responses is None else [self.responses[i] for i in rows.tolist()]
        index = prompts.tolist()
        return Rollout(
            [self.prompts[i] for i in index],
            self.samples.select(rows),
            self.rewards[rows],
            self.group_size,
            responses,
            {name: [values[i] for i in index] for name, values in self.columns.items()},
            {name: values[rows.to(values.device)] for name, values in self.by_reward.items()},
        )


class PromptEncoder:
    """Prompt strings -> left-padded ids [B, P] and mask [B, P] bool, refusing prompts that cannot fit."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int,
        context_length: int | None,
        chat_template: bool = False,
        name: str = "the policy",
    ):
        if chat_template and not tokenizer.chat_template:
            raise ValueError(f"chat_template is set but the tokenizer of {name!r} has no chat template")
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        self.context_length, self.chat_template, self.name = context_length, chat_template, name

    def __call__(self, prompts: Sequence[Any], device: torch.device) -> tuple[Tensor, Tensor]:
        if self.chat_template or not all(isinstance(p, str) for p in prompts):
            if not self.tokenizer.chat_template:
                raise ValueError(
                    f"the prompts are lists of messages but the tokenizer of {self.name!r} has no chat template: "
                    "give the prompts as text, or set model.init_args.tokenizer to one that has a chat template"
                )
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}] if isinstance(p, str) else p,
                    tokenize=False,
                    add_generation_prompt=True,
                )
                for p in prompts
            ]
            # The template writes its own special tokens; the tokenizer must not add more.
            enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        else:
            enc = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device).bool()
        lengths = mask.sum(1)  # [B]
        if (lengths == 0).any():
            raise ValueError("empty prompt: every prompt needs at least one token")
        limit = self.context_length
        if limit is not None and ids.shape[1] + self.max_new_tokens > limit:
            longest = prompt_text(prompts[int(lengths.argmax())])
            raise ValueError(
                f"prompt of {int(lengths.max())} tokens + max_new_tokens={self.max_new_tokens} exceeds "
                f"the model's context of {limit} tokens: {longest[:80]!r}"
            )
        return ids, mask

    def warn_unknown_words(self, prompts: Sequence[Any]) -> None:
        """One warning listing the words the tokenizer can only read as its unknown token."""
        unk = self.tokenizer.unk_token_id
        if unk is None or unk == self.tokenizer.eos_token_id:  # byte-level BPE has no unknown words
            return
        words = sorted({w for p in prompts for w in prompt_text(p).split() if unk in self.tokenizer(w)["input_ids"]})
        if words:
            shown = ", ".join(repr(w) for w in words[:12]) + (", ..." if len(words) > 12 else "")
            warnings.warn(
                f"{len(words)} word(s) of the prompts are not in the tokenizer's vocabulary and read as "
                f"{self.tokenizer.unk_token}: {shown}",
                UserWarning,
                stacklevel=3,
            )


class ResponseSampler:
    """Draws k responses per prompt exactly from the policy: the fast KV-cache loop, generate, or a
    vLLM engine given the policy's weights before each rollout (`sampling.engine`)."""

    def __init__(self, policy: nn.Module, tokenizer: PreTrainedTokenizerBase, stop_ids: list[int], sampling: Sampling):
        if sampling.sampler == "fast" and getattr(policy.config, "is_encoder_decoder", False):
            raise ValueError("sampler 'fast' drives decoder-only models; use sampler: hf for an encoder-decoder")
        self.policy, self.tokenizer, self.stop_ids, self.settings = policy, tokenizer, stop_ids, sampling
        self.generation_config = sampling_config(
            sampling.max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            **(sampling.generation_kwargs or {}),
        )
        self._static_cache: tuple[tuple, Any] | None = None  # decode_cache "static": reused across batches
        self._compiled_decode = None
        self.engine = (
            None
            if sampling.engine == "hf"
            else VLLMSampler(policy, stop_ids, tokenizer.pad_token_id, sampling.max_new_tokens, sampling.vllm)
        )

    def __call__(self, ids: Tensor, mask: Tensor, k: int, synced: bool = False) -> Samples:
        """k responses for each prompt row of ids [B, P]; `synced`: every rank steps until all are done."""
        s = self.settings
        if self.engine is not None:
            return self.engine(ids, mask, k, synced=synced)
        if s.sampler == "hf":
            return sample_responses(self.policy, ids, mask, k, self.generation_config, synced_gpus=synced)
        cache = self.static_cache(ids.shape[0] * k, ids.shape[1] + s.max_new_tokens, ids.device)
        return sample_fast(
            self.policy,
            ids,
            mask,
            k,
            s.max_new_tokens,
            self.stop_ids,
            self.tokenizer.pad_token_id,
            synced_gpus=synced,
            cache=cache,
            decode=self.compiled_decode(ids.device) if s.compile_decode else None,
        )

    def static_cache(self, rows: int, length: int, device: torch.device):
        """decode_cache "static": an empty KV cache, the previous batch's reset when the shapes agree
        (the same tensors batch after batch, as CUDA graphs want them); "dynamic": None."""
        if self.settings.decode_cache != "static":
            return None
        key = (rows, length, device)
        if self._static_cache is not None and self._static_cache[0] == key:
            self._static_cache[1].reset()
        else:
            self._static_cache = (key, static_cache(self.policy, length))
        return self._static_cache[1]

    def compiled_decode(self, device: torch.device):
        """The policy's forward compiled once for decode steps (fixed shapes with a static cache)."""
        if self._compiled_decode is None:
            # CUDA graphs remove the per-token launch overhead that dominates small-model decoding.
            mode = "reduce-overhead" if device.type == "cuda" else None
            self._compiled_decode = torch.compile(self.policy.forward, mode=mode, dynamic=False)
        return self._compiled_decode

    def decode(self, samples: Samples) -> list[str]:
        """Only the tokens under the mask, without the EOS: text as a reader would see it."""
        response = samples.response.masked_fill(~samples.response_mask, self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(response, skip_special_tokens=True)


def score_responses(
    reward: Reward | None, prompts: Sequence[Any], responses: Sequence[str], device: torch.device
) -> Tensor | Scores:
    """Rewards [N] for repeated prompts and their responses (zeros without a reward), checked; for a
    list of rewards, their Scores. `prompts.columns` (RepeatedPrompts) go to the rewards that take them."""
    if reward is None:
        return torch.zeros(len(responses), device=device)
    columns = getattr(prompts, "columns", {})
    if isinstance(reward, WeightedRewards):
        scores = reward.scores(prompts, responses, columns)
        total = check_rewards(scores.total, prompts, responses, reward_name(reward)).to(device)
        return Scores(total, {name: values.to(device) for name, values in scores.by_reward.items()})
    return check_rewards(call_reward(reward, prompts, responses, columns), prompts, responses, reward_name(reward)).to(
        device
    )


def completion_ids(samples: Samples) -> list[list[int]]:
    """The response tokens of each sample up to and including its stop token (TRL's completion_ids)."""
    return [row[mask].tolist() for row, mask in zip(samples.response, samples.response_mask, strict=True)]


def rollout_prompts(batch: PromptBatch, k: int, samples: Samples) -> RepeatedPrompts:
    """The prompts of the N responses with their columns, and `completion_ids` for reward functions."""
    repeated = batch.repeated(k)
    repeated.columns["completion_ids"] = completion_ids(samples)
    return repeated
