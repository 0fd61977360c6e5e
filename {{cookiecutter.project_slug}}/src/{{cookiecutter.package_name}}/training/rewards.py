"""Rewards: callables `(prompts, responses) -> Tensor[N]` of floats, one per response.

A `Reward` subclass is set by `class_path` in a config; a TRL-style reward function
`reward(prompts, completions, completion_ids, **columns) -> list[float | None]` by its dotted path
(`reward: my_rewards.reward`), called as TRL calls it: the dataset's other columns as keyword lists
aligned with the completions. A list of rewards is summed with weights (`WeightedRewards`), a None
left out of the sum as TRL leaves it out. Rewards receive decoded text: a reward model with its own
tokenizer re-encodes it (docs/estimators.md §6.7).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
    """A TRL-style reward function as a `Reward`: `function(prompts=..., completions=..., **columns)`.

    Called as TRL calls its reward functions: keywords, the prompts repeated per completion, each
    column a list aligned with the completions (the rollout adds `completion_ids`), and for a
    conversational prompt (a list of messages) each completion as [{"role": "assistant", "content": ...}].
    A None ("does not apply") reads as nan: left out of a weighted sum, refused where it is all there is.
    """

    def __init__(self, function: RewardFunction):
        self.function = function
        self.name = getattr(function, "__name__", type(function).__name__)  # what a plot calls the reward

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str], **columns: list) -> Tensor:
        conversational = bool(prompts) and not isinstance(prompts[0], str)
        completions = [[{"role": "assistant", "content": r}] for r in responses] if conversational else list(responses)
        values = self.function(prompts=list(prompts), completions=completions, **columns)
        try:
            return torch.tensor([float("nan") if v is None else float(v) for v in values])
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"reward {self.name} returned {values!r:.120}: a reward is a list of numbers or None"
            ) from err


@dataclass
class Scores:
    """What a list of rewards gives a batch: the weighted total and each reward's own values."""

    total: Tensor  # [N] sum over rewards of weight x value, a None (nan) left out
    by_reward: dict[str, Tensor]  # name -> [N], nan where the reward returned None


class WeightedRewards(nn.Module, Reward):
    """Several rewards, summed with weights as TRL's reward_weights: nansum_i w_i r_i per response.

    An nn.Module so that rewards which are models move with the module (and stay frozen)."""

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | None = None):
        super().__init__()
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards) or not rewards:
            raise ValueError(
                f"model.init_args.reward_weights has {len(weights)} weights for {len(rewards)} rewards: "
                "one weight per reward, in their order"
            )
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"model.init_args.reward_weights must be finite numbers, got {weights}")
        self.rewards, self.weights = list(rewards), weights
        self.models = nn.ModuleList([r for r in rewards if isinstance(r, nn.Module)])
        names = [reward_name(r) for r in rewards]
        # Each reward's metrics column is its name; a name given twice is numbered from its second use.
        self.names = [n if names[:i].count(n) == 0 else f"{n}_{names[:i].count(n) + 1}" for i, n in enumerate(names)]
        self.name = " + ".join(n if w == 1 else f"{w:g} x {n}" for n, w in zip(self.names, weights, strict=True))

    def train(self, mode: bool = True):
        return super().train(False)  # the rewards' models stay in eval mode

    def scores(self, prompts: Sequence[Any], responses: Sequence[str], columns: dict[str, list]) -> Scores:
        """Each reward's values (checked, each error naming its reward) and the weighted total."""
        by_reward = {}
        for name, reward in zip(self.names, self.rewards, strict=True):
            values = call_reward(reward, prompts, responses, columns)
            by_reward[name] = check_rewards(values, prompts, responses, name, allow_none=True).cpu()
        stacked = torch.stack(list(by_reward.values()), dim=1)  # [N, rewards]
        weights = torch.tensor(self.weights, dtype=stacked.dtype)
        total = (stacked * weights).nansum(dim=1)
        total[stacked.isnan().all(dim=1)] = float("nan")  # no reward applies: refused by check_rewards
        return Scores(total, by_reward)

    def __call__(self, prompts: Sequence[Any], responses: Sequence[str], **columns: list) -> Tensor:
        return self.scores(prompts, responses, columns).total


def call_reward(reward: Reward, prompts: Sequence[Any], responses: Sequence[str], columns: dict[str, list]) -> Tensor:
    """A reward called with the columns its `__call__` accepts by name (all of them with **kwargs)."""
    if not columns:
        return reward(prompts, responses)
    module_call = isinstance(reward, nn.Module) and type(reward).__call__ is nn.Module.__call__
    method = reward.forward if module_call else reward.__call__
    bound = hasattr(method, "__func__")
    named = _named_parameters(method.__func__ if bound else method, bound)
    if named is None:
        return reward(prompts, responses, **columns)
    return reward(prompts, responses, **{k: v for k, v in columns.items() if k in named})


@functools.cache
def _named_parameters(function: Callable, bound: bool) -> frozenset[str] | None:
    """The parameter names of a reward's call (`bound`: less the first, self), None when it takes
    **kwargs: read once per function, not per batch (a signature costs about a small reward's call)."""
    parameters = list(inspect.signature(function).parameters.values())[int(bound) :]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters)


def as_reward(
    reward: Reward | RewardFunction | Sequence[Reward | RewardFunction] | None,
    weights: Sequence[float] | None = None,
) -> Reward | None:
    """A `Reward` as it is (frozen if it is a model); a plain function wrapped as a `FunctionReward`;
    a list of them, or any reward with weights, as `WeightedRewards`."""
    if isinstance(reward, list | tuple) or (weights is not None and reward is not None):
        rewards = list(reward) if isinstance(reward, list | tuple) else [reward]
        return freeze(WeightedRewards([as_reward(r) for r in rewards], weights))
    if weights is not None:
        raise ValueError("model.init_args.reward_weights is set but there is no reward to weigh")
    if reward is None or isinstance(reward, Reward):
        return freeze(reward) if isinstance(reward, nn.Module) else reward
    if not callable(reward):
        raise TypeError(f"reward must be a Reward or a function, got {type(reward).__name__}")
    return FunctionReward(reward)


def reward_config(reward: object) -> object:
    """What a checkpoint stores of the reward: a function as its dotted path, a class_path config as a
    dict, a list as the list of theirs."""
    if isinstance(reward, list | tuple):
        return [reward_config(r) for r in reward]
    if callable(reward) and hasattr(reward, "__qualname__"):
        return f"{reward.__module__}.{reward.__qualname__}"
    return reward.as_dict() if hasattr(reward, "as_dict") else reward


def reward_name(reward: object) -> str:
    """What messages and plots call a reward: a function's name, or its class's."""
    return getattr(reward, "name", None) or type(reward).__name__


def exact_match(completions: list, answer: list, **kwargs) -> list[float]:
    """TRL-style: 1.0 where the completion, stripped, is the `answer` column's value (as text), else 0.0.

    The verifiable reward of configs/repeat_word.yaml: a copy of it reads any column by its name."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # text, or a chat message
    return [float(text.strip() == str(a).strip()) for text, a in zip(texts, answer, strict=True)]


def samples_per_prompt(prompts: Sequence[str]) -> int:
    """k of prompts repeated k times each, adjacent (the rollout's order): the gcd of the runs'
    lengths, since equal prompts next to each other make one run of a multiple of k."""
    runs = [len(list(run)) for _, run in itertools.groupby(prompts)]
    return math.gcd(*runs) if runs else 1


def check_rewards(
    rewards: Tensor, prompts: Sequence[Any], responses: Sequence[str], name: str | None = None, allow_none: bool = False
) -> Tensor:
    """Rewards must be one finite float per response; name the text that broke the rule.

    `prompts` are repeated per response, as the rollout repeats them; `name`: the reward's;
    `allow_none`: nan stands for a None (one reward of several that does not apply)."""
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
    bad = (~(torch.isfinite(rewards) | (allow_none & rewards.isnan()))).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        why = "" if name is None else f" from reward {name}"
        raise ValueError(
            f"non-finite reward {rewards[i].item()} for prompt {prompts[i]!r} and response {responses[i]!r}{why}"
            + ("; a None must leave at least one reward that applies" if rewards[i].isnan() else "")
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
    "FunctionReward",
    "KeywordReward",
    "Reward",
    "SentimentClassifierReward",
    "VaderSentimentReward",
    "WeightedRewards",
    "check_rewards",
    "exact_match",
]
