"""Rewards: callables `(prompts, responses) -> Tensor[N]` of floats, one per response.

A `Reward` subclass is set by `class_path` in a config; a TRL-style reward function
`reward(prompts, completions, **kwargs) -> list[float]` by its dotted path
(`reward: my_rewards.reward`). Rewards receive decoded text: a reward model with its own
tokenizer re-encodes it (docs/estimators.md §6.7).
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..models.loading import freeze


class Reward(ABC):
    """Base of rewards: `reward(prompts, responses) -> Tensor[N]`. Subclass it and set it by class_path."""

    @abstractmethod
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor: ...


# TRL's reward functions: called with keywords, one float per completion, prompts repeated per completion.
RewardFunction = Callable[..., Sequence[float | None]]


class FunctionReward(Reward):
    """A TRL-style reward function as a `Reward`: `function(prompts=..., completions=...)`.

    TRL calls its reward functions with keywords (and more of them, which `**kwargs` absorbs), so
    a function written for TRL's trainers runs unchanged. A None (TRL: "does not apply") is
    refused like any other non-finite reward.
    """

    def __init__(self, function: RewardFunction):
        self.function = function
        self.name = getattr(function, "__name__", type(function).__name__)  # what a plot calls the reward

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        values = self.function(prompts=list(prompts), completions=list(responses))
        return torch.tensor([float("nan") if v is None else float(v) for v in values])


def as_reward(reward: Reward | RewardFunction | None) -> Reward | None:
    """A `Reward` as it is; a plain function wrapped as a `FunctionReward`."""
    if reward is None or isinstance(reward, Reward):
        return reward
    if not callable(reward):
        raise TypeError(f"reward must be a Reward or a function, got {type(reward).__name__}")
    return FunctionReward(reward)


def reward_config(reward: object) -> object:
    """What a checkpoint stores of the reward: a function as its dotted path, a class_path config as a dict."""
    if callable(reward) and hasattr(reward, "__qualname__"):
        return f"{reward.__module__}.{reward.__qualname__}"
    return reward.as_dict() if hasattr(reward, "as_dict") else reward


def reward_name(reward: object) -> str:
    """What messages and plots call a reward: a function's name, or its class's."""
    return getattr(reward, "name", None) or type(reward).__name__


def samples_per_prompt(prompts: Sequence[str]) -> int:
    """k of prompts repeated k times each, adjacent (the rollout's order): the gcd of the runs'
    lengths, since equal prompts next to each other make one run of a multiple of k."""
    runs = [len(list(run)) for _, run in itertools.groupby(prompts)]
    return math.gcd(*runs) if runs else 1


def check_rewards(rewards: Tensor, prompts: Sequence[str], responses: Sequence[str], name: str | None = None) -> Tensor:
    """Rewards must be one finite float per response; name the text that broke the rule.

    `prompts` are repeated per response, as the rollout repeats them; `name`: the reward's."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.shape != (len(responses),):
        k = samples_per_prompt(prompts)
        who = f"reward {name}" if name else "the reward"
        got = f"{rewards.shape[0]} values" if rewards.ndim == 1 else f"a tensor of shape {tuple(rewards.shape)}"
        raise ValueError(
            f"{who} returned {got} for {len(responses)} responses ({len(responses) // k} prompts x {k} "
            "samples per prompt: sampling.samples_per_prompt when training, val_samples_per_prompt or "
            "test_samples_per_prompt when evaluating); a reward returns one value per response, in their order"
        )
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(
            f"non-finite reward {rewards[i].item()} for prompt {prompts[i]!r} and response {responses[i]!r}"
        )
    return rewards


class VaderSentimentReward(Reward):
    """VADER compound sentiment in [-1, 1], offline.

    VADER (vaderSentiment) is a maintained, rule-based sentiment model whose lexicon ships inside
    the pip package, so it needs no download and no GPU, and it reacts to single words: a
    visible learning signal for the tiny offline policy.
    """

    def __init__(self, include_prompt: bool = True):
        """
        Args:
            include_prompt: score prompt + response (as a reader would see them), not the response alone.
        """
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.include_prompt = include_prompt
        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        texts = [f"{p} {r}" if self.include_prompt else r for p, r in zip(prompts, responses, strict=True)]
        return torch.tensor([self.analyzer.polarity_scores(t)["compound"] for t in texts])


class SentimentClassifierReward(nn.Module, Reward):
    """The logit of one label of a sequence classifier, e.g. `lvwerra/distilbert-imdb` POSITIVE."""

    def __init__(
        self,
        name_or_path: str,
        positive_label: str = "POSITIVE",
        include_prompt: bool = True,
        max_length: int = 512,
        batch_size: int = 64,
        trust_remote_code: bool = False,
    ):
        """
        Args:
            name_or_path: hub name or local folder of an AutoModelForSequenceClassification.
            positive_label: the label whose logit is the reward (a name from config.id2label, or an index).
            include_prompt: classify prompt + response, not the response alone.
            max_length: the classifier's input is truncated to this many of its own tokens.
            batch_size: texts per classifier forward.
            trust_remote_code: allow code shipped with the checkpoint to run.
        """
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        self.model = freeze(
            AutoModelForSequenceClassification.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        )
        labels = {str(v): int(k) for k, v in self.model.config.id2label.items()}
        if positive_label in labels:
            self.label_index = labels[positive_label]
        elif positive_label.isdigit() and int(positive_label) < self.model.config.num_labels:
            self.label_index = int(positive_label)
        else:
            raise ValueError(f"label {positive_label!r} not in the classifier's labels {sorted(labels)}")
        self.include_prompt = include_prompt
        self.max_length = max_length
        self.batch_size = batch_size

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: dropout off (docs/estimators.md §6.2)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        texts = [f"{p}{r}" if self.include_prompt else r for p, r in zip(prompts, responses, strict=True)]
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            # Re-encode with the classifier's own tokenizer (docs/estimators.md §6.7).
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            out.append(self.model(**enc).logits[:, self.label_index].float().cpu())
        return torch.cat(out)


class KeywordReward(Reward):
    """Count of given words in the response: a transparent reward for tests and smoke runs."""

    def __init__(self, words: list[str], scale: float = 1.0):
        """
        Args:
            words: words that each earn `scale` per occurrence in the response.
            scale: reward per occurrence.
        """
        self.words = set(words)
        self.scale = scale

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        return torch.tensor([self.scale * sum(w in self.words for w in r.split()) for r in responses])


__all__ = [
    "KeywordReward",
    "Reward",
    "SentimentClassifierReward",
    "VaderSentimentReward",
    "check_rewards",
]
