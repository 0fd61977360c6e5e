"""Prompts: built-in (offline), a local .jsonl/.txt file, or a Hugging Face dataset (IMDB).

Batches are lists of prompt strings; the module tokenizes them with the policy's tokenizer.
Validation prompts are fixed and never drawn from the training prompts.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..models.vocabulary import TRAIN_PROMPTS, VAL_PROMPTS
from .lightning_internals import batches_done_in_restarted_epoch
from .options import at_least


def read_prompts(path: str | Path, option: str = "prompt file") -> list[str]:
    """One prompt per line of a .txt file, or per object of a .jsonl file ("prompt" or "text" key).

    `option` names the setting the path came from (`data.train_path`) in the messages.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path} does not exist (give the path of a .txt or .jsonl file)")
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{option} {path} must be .txt (one prompt a line) or .jsonl")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
            prompts.append(str(record["prompt"] if "prompt" in record else record["text"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: expected a JSON object with a 'prompt' or 'text' key") from err
    if not prompts:
        raise ValueError(f"{option} {path} holds no prompts (one prompt a line, blank lines are skipped)")
    return prompts


class PromptDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: Literal["builtin", "file", "hf"] = "builtin",
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        hf_dataset: str = "stanfordnlp/imdb",
        hf_text_field: str = "text",
        hf_tokenizer: str | None = None,
        prompt_tokens: tuple[int, int] = (2, 8),
        max_train_prompts: int | None = None,
        num_val_prompts: int = 16,
        epoch_repeats: int = 1,
        batch_size: int = 8,
        seed: int = 0,
    ):
        """
        Args:
            source: "builtin" (offline prompts), "file" (train_path/val_path) or "hf" (a hub dataset).
            train_path: .txt or .jsonl file of training prompts (source "file").
            val_path: file of validation prompts; without it the last num_val_prompts of train_path are held out.
            test_path: .txt or .jsonl file of prompts for `train.py test` (the KL evaluation), each
                evaluated once; without it, source "builtin" uses its validation prompts.
            hf_dataset: dataset name on the hub (source "hf"); its "train" split trains, "test" validates.
            hf_text_field: the dataset column that holds the text.
            hf_tokenizer: tokenizer that cuts hub texts into prompts (the policy's, e.g. lvwerra/gpt2-imdb).
            prompt_tokens: hub texts are cut to their first n tokens, n uniform in this inclusive range.
            max_train_prompts: keep at most this many training prompts (None: all).
            num_val_prompts: number of fixed validation prompts.
            epoch_repeats: one epoch goes over the training prompts this many times (for small prompt sets).
            batch_size: prompts per device per step; each is sampled samples_per_prompt times.
            seed: seed for the order of training prompts (a function of seed and epoch only, so a
                resumed run sees the batches the interrupted one would have) and for cutting and
                subsampling hub texts.
        """
        super().__init__()
        at_least("data.batch_size", batch_size, 1)
        at_least("data.epoch_repeats", epoch_repeats, 1)
        lo, hi = prompt_tokens
        if not 1 <= lo <= hi:
            raise ValueError(f"prompt_tokens must be (min, max) with 1 <= min <= max, got {prompt_tokens}")
        self.save_hyperparameters()
        self.train_prompts: list[str] = []
        self.val_prompts: list[str] = []
        self.test_prompts: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        if stage == "test":
            self.test_prompts = self.test_prompts or self._test_prompts()
        elif not self.train_prompts:
            self.train_prompts, self.val_prompts = self._fit_prompts()
            per_epoch = len(self.train_prompts) * self.hparams.epoch_repeats
            if self.hparams.batch_size > per_epoch:
                warnings.warn(
                    f"data.batch_size={self.hparams.batch_size} is more than the {per_epoch} training prompts of an "
                    f"epoch: each epoch is one step of {per_epoch} prompts",
                    UserWarning,
                    stacklevel=2,
                )

    def _test_prompts(self) -> list[str]:
        h = self.hparams
        if h.test_path:
            return read_prompts(h.test_path, "data.test_path")
        if h.source == "builtin":
            return list(VAL_PROMPTS)
        raise ValueError(
            f"`test` needs prompts: set data.test_path to a .txt or .jsonl file (source {h.source!r} has no test set)"
        )

    def _fit_prompts(self) -> tuple[list[str], list[str]]:
        h = self.hparams
        if h.source == "builtin":
            train, val = list(TRAIN_PROMPTS), list(VAL_PROMPTS)
        elif h.source == "file":
            if not h.train_path:
                raise ValueError("source 'file' needs data.train_path")
            train = read_prompts(h.train_path, "data.train_path")
            if h.val_path:
                val = read_prompts(h.val_path, "data.val_path")
            elif len(train) > h.num_val_prompts:
                train, val = train[: -h.num_val_prompts], train[-h.num_val_prompts :]
            else:
                raise ValueError(
                    f"{h.train_path} has {len(train)} prompts: too few to hold out {h.num_val_prompts} "
                    "for validation; give data.val_path or lower data.num_val_prompts"
                )
        else:
            train, val = self._hub_prompts("train"), self._hub_prompts("test")
        if h.max_train_prompts is not None:
            train = train[: h.max_train_prompts]
        val = val[: h.num_val_prompts]
        if not train or not val:
            raise ValueError(f"prompt source {h.source!r} gave {len(train)} training and {len(val)} validation prompts")
        return train, val

    def _hub_prompts(self, split: str) -> list[str]:
        from datasets import load_dataset  # optional dependency: pip install ".[hub]"
        from transformers import AutoTokenizer

        h = self.hparams
        if not h.hf_tokenizer:
            raise ValueError("source 'hf' needs data.hf_tokenizer to cut texts into prompts")
        tokenizer = AutoTokenizer.from_pretrained(h.hf_tokenizer)
        texts = load_dataset(h.hf_dataset, split=split)[h.hf_text_field]
        rng = random.Random(f"{h.seed}-{split}")
        limit = h.max_train_prompts if split == "train" else h.num_val_prompts
        if limit is not None:
            texts = rng.sample(list(texts), min(limit, len(texts)))
        prompts = []
        for text in texts:
            ids = tokenizer(text.replace("<br />", " "))["input_ids"]
            prompts.append(tokenizer.decode(ids[: rng.randint(*h.prompt_tokens)]))
        return prompts

    def train_dataloader(self) -> DataLoader:
        prompts = self.train_prompts * self.hparams.epoch_repeats
        ranks, rank = self._ranks()
        sampler = EpochShuffle(len(prompts), self.hparams.seed, self._epoch, self._items_done, ranks, rank)
        return DataLoader(prompts, batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=list)

    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _items_done(self) -> int:
        # Resuming mid-epoch: Lightning has restored its loop by the time an epoch's iteration
        # starts, and the order continues after the batches already trained on.
        # Counted over all ranks: the order is one list dealt to the ranks in turn.
        return batches_done_in_restarted_epoch(self.trainer) * self.hparams.batch_size * self._ranks()[0]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_prompts, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=list)

    def test_dataloader(self) -> DataLoader:
        ranks, rank = self._ranks()
        sampler = EachOnceSampler(self.test_prompts, num_replicas=ranks, rank=rank)
        return DataLoader(self.test_prompts, batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=list)


class EpochShuffle(DistributedSampler):
    """A random order of n items that depends only on (seed, epoch), dealt to the ranks in turn
    (item i of the order to rank i % ranks, padded as DistributedSampler pads), continuing after
    the first `done()` items of the order: a resumed epoch picks up where the checkpoint left it,
    on every rank. Being a DistributedSampler, Lightning keeps it as it is under DDP (its own
    wrapper would not know where the order continues).
    """

    def __init__(
        self, n: int, seed: int, epoch: Callable[[], int], done: Callable[[], int], ranks: int = 1, rank: int = 0
    ):
        super().__init__(range(n), num_replicas=ranks, rank=rank, shuffle=False)
        self.n, self.seed, self.epoch_of, self.done = n, seed, epoch, done

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch_of())
        order = torch.randperm(self.n, generator=generator).tolist()
        order += order[: self.total_size - self.n]
        return iter(order[self.done() + self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class EachOnceSampler(DistributedSampler):
    """Rank r takes items r, r + R, r + 2R, ...: every item exactly once over all ranks.

    Lightning's default distributed sampler pads the last batch by repeating items, which would
    count some prompts twice in an evaluation. Being a DistributedSampler, this one is kept as is.
    """

    def __init__(self, dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def stage_prompts(data: L.LightningDataModule | None, stage: str) -> list[str]:
    """Every prompt a stage of the trainer will see (checked before its first step)."""
    names = {"fit": ("train_prompts", "val_prompts"), "validate": ("val_prompts",), "test": ("test_prompts",)}
    return [p for name in names.get(stage, ()) for p in getattr(data, name, [])]
