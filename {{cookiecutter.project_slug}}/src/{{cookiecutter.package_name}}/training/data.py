"""Prompts: built-in (offline), local files, a Hugging Face `datasets` dataset, or IMDB reviews cut short.

A prompt is a string, or a list of {role, content} messages (rendered with the tokenizer's chat
template). Every other column of a file or dataset travels with its prompt: a batch is then a
`PromptBatch` (prompts and columns, aligned), and reward functions receive the columns as TRL
passes them. Prompts alone make a batch a plain list, as they always did. Validation prompts are
fixed and never drawn from the training prompts.
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..models.vocabulary import TRAIN_PROMPTS, VAL_PROMPTS
from .lightning_internals import batches_done_in_restarted_epoch
from .options import at_least

SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
# The keywords TRL gives a reward function itself: a dataset column may not take these names.
RESERVED_COLUMNS = ("prompts", "completions", "completion_ids")
Columns = dict[str, list]  # column name -> one value per prompt, as the file or dataset holds it


@dataclass
class PromptBatch:
    """Prompts with the dataset's other columns, each column a list aligned with the prompts."""

    prompts: list  # str, or a list of {role, content} messages
    columns: Columns = field(default_factory=dict)

    @classmethod
    def of(cls, batch: PromptBatch | Sequence) -> PromptBatch:
        """A batch as it comes: a PromptBatch, or prompts alone (a list of strings or of message lists)."""
        return batch if isinstance(batch, PromptBatch) else cls(list(batch))

    @classmethod
    def collate(cls, rows: list[tuple[Any, dict[str, Any]]]) -> PromptBatch:
        """(prompt, {column: value}) rows -> one batch."""
        names = rows[0][1].keys() if rows else ()
        return cls([prompt for prompt, _ in rows], {name: [values[name] for _, values in rows] for name in names})

    def __len__(self) -> int:
        return len(self.prompts)

    def repeated(self, k: int) -> RepeatedPrompts:
        """Each prompt k times, adjacent (the rollout's order), its columns alike."""
        columns = {name: [v for v in values for _ in range(k)] for name, values in self.columns.items()}
        return RepeatedPrompts([p for p in self.prompts for _ in range(k)], columns)


class RepeatedPrompts(list):
    """The prompts of N responses (each prompt k times), with `columns`: the dataset's other columns
    repeated alike, plus what the rollout adds (`completion_ids`). A list, so that a `score(prompts,
    responses)` written for plain prompts reads it as it always did."""

    def __init__(self, prompts: Sequence = (), columns: Columns | None = None):
        super().__init__(prompts)
        self.columns: Columns = dict(columns or {})


def prompt_text(prompt: Any) -> str:
    """A prompt's words: the string, or the contents of its messages."""
    return prompt if isinstance(prompt, str) else " ".join(str(m["content"]) for m in prompt)


def checked_prompt(value: Any, where: str) -> str | list[dict]:
    """A string (other scalars as their text), or a list of {role, content} messages."""
    if isinstance(value, list | tuple):
        if value and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value):
            return [dict(m) for m in value]
        raise ValueError(f"{where}: a prompt is a string or a list of messages (role, content), got {value!r:.80}")
    if value is None:
        raise ValueError(f"{where}: empty prompt (None)")
    return str(value)


def split_columns(columns: Columns, prompt_column: str, where: str) -> tuple[list, Columns]:
    """The prompts and the other columns of a table; refuses a missing prompt column."""
    columns = dict(columns)
    if prompt_column not in columns and prompt_column == "prompt" and "text" in columns:
        prompt_column = "text"  # .jsonl files of {"text": ...} were read so before columns existed
    if prompt_column not in columns:
        raise ValueError(
            f"{where} has no column {prompt_column!r} (its columns: {', '.join(columns) or 'none'}); "
            "set data.prompt_column to the column that holds the prompts"
        )
    reserved = [name for name in columns if name in RESERVED_COLUMNS]
    if reserved:
        raise ValueError(
            f"{where}: column {reserved[0]!r} would clash with the keyword a reward function gets under that "
            "name; rename it in the data"
        )
    prompts = [checked_prompt(v, f"{where}, row {i + 1}") for i, v in enumerate(columns.pop(prompt_column))]
    return prompts, columns


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: expected a JSON object (one a line)") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object with a 'prompt' or 'text' key")
        rows.append(record)
    return rows


def _as_columns(rows: list[dict]) -> Columns:
    """Rows of dicts -> columns; a key missing from a row is None there (as `datasets` reads it)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: [row.get(name) for row in rows] for name in names}


def read_table(path: str | Path, option: str = "prompt file", prompt_column: str = "prompt") -> tuple[list, Columns]:
    """The prompts and other columns of a .txt (one prompt a line), .jsonl, .json (a list of objects or
    an object of columns), .csv (values are the file's strings) or .parquet file.

    `option` names the setting the path came from (`data.train_path`) in the messages.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path} does not exist (give the path of a {', '.join(SUFFIXES)} file)")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{option} {path} must be .txt (one prompt a line), .jsonl, .json, .csv or .parquet")
    if path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        columns: Columns = {prompt_column: lines}
    elif path.suffix == ".jsonl":
        columns = _as_columns(_jsonl_rows(path))
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        columns = _as_columns(data) if isinstance(data, list) else dict(data)
    elif path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as file:
            columns = _as_columns(list(csv.DictReader(file)))
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(f"{option} {path}: reading .parquet needs pyarrow (pip install -e '.[hub]')") from err
        columns = pq.read_table(path).to_pydict()
    if not any(columns.values()):
        raise ValueError(f"{option} {path} holds no prompts (one prompt a line, blank lines are skipped)")
    return split_columns(columns, prompt_column, f"{option} {path}")


def read_prompts(path: str | Path, option: str = "prompt file") -> list[str]:
    """The prompts of a file (read_table without the other columns)."""
    return read_table(path, option)[0]


def _take(table: tuple[list, Columns], part: slice) -> tuple[list, Columns]:
    prompts, columns = table
    return prompts[part], {name: values[part] for name, values in columns.items()}


class PromptDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: Literal["builtin", "file", "datasets", "hf"] = "builtin",
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        prompt_column: str = "prompt",
        hf_dataset: str = "stanfordnlp/imdb",
        hf_config: str | None = None,
        hf_val_split: str | None = "test",
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
            source: "builtin" (offline prompts), "file" (train_path/val_path), "datasets" (a Hugging Face
                dataset by name or local path, rows as they are) or "hf" (hub texts cut into short prompts, IMDB).
            train_path: training prompts (source "file"): .txt (one a line), .jsonl, .json, .csv or .parquet;
                columns other than prompt_column go with each prompt to the reward functions.
            val_path: file of validation prompts; without it the last num_val_prompts of train_path are held out.
            test_path: file of prompts for `train.py test` (the KL evaluation), each evaluated once; without
                it, sources "builtin" and "datasets" use their validation prompts.
            prompt_column: the column that holds the prompts: a string, or a list of {role, content}
                messages (rendered with the tokenizer's chat template).
            hf_dataset: for source "datasets", a hub name or a local folder or file for `load_dataset`; for
                source "hf", a hub dataset whose "train" split trains and "test" split validates.
            hf_config: the dataset's configuration (subset) name, if it has several (source "datasets").
            hf_val_split: the split that validates (source "datasets"); None: the last num_val_prompts of
                "train" are held out.
            hf_text_field: the dataset column that holds the text (source "hf").
            hf_tokenizer: tokenizer that cuts hub texts into prompts (source "hf"), e.g. lvwerra/gpt2-imdb.
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
        self.train_prompts: list = []
        self.val_prompts: list = []
        self.test_prompts: list = []
        # The other columns of each split ("train", "val", "test"), aligned with its prompts.
        self.columns: dict[str, Columns] = {}

    def setup(self, stage: str | None = None) -> None:
        if stage == "test":
            if not self.test_prompts:
                self.test_prompts, self.columns["test"] = self._test_table()
        elif not self.train_prompts:
            (self.train_prompts, self.columns["train"]), (self.val_prompts, self.columns["val"]) = self._fit_tables()
            per_epoch = len(self.train_prompts) * self.hparams.epoch_repeats
            if self.hparams.batch_size > per_epoch:
                warnings.warn(
                    f"data.batch_size={self.hparams.batch_size} is more than the {per_epoch} training prompts of an "
                    f"epoch: each epoch is one step of {per_epoch} prompts",
                    UserWarning,
                    stacklevel=2,
                )

    def _test_table(self) -> tuple[list, Columns]:
        h = self.hparams
        if h.test_path:
            return read_table(h.test_path, "data.test_path", h.prompt_column)
        if h.source == "builtin":
            return list(VAL_PROMPTS), {}
        if h.source == "datasets":
            return self._fit_tables()[1]
        raise ValueError(
            f"`test` needs prompts: set data.test_path to a prompt file (source {h.source!r} has no test set)"
        )

    def _fit_tables(self) -> tuple[tuple[list, Columns], tuple[list, Columns]]:
        h = self.hparams
        if h.source == "builtin":
            train, val = (list(TRAIN_PROMPTS), {}), (list(VAL_PROMPTS), {})
        elif h.source == "file":
            if not h.train_path:
                raise ValueError("source 'file' needs data.train_path")
            train = read_table(h.train_path, "data.train_path", h.prompt_column)
            val = read_table(h.val_path, "data.val_path", h.prompt_column) if h.val_path else None
        elif h.source == "datasets":
            train, val = self._dataset_table("train"), self._dataset_table(h.hf_val_split) if h.hf_val_split else None
        else:
            train, val = (self._hub_prompts("train"), {}), (self._hub_prompts("test"), {})
        if val is None:  # the last num_val_prompts of the training rows validate
            if len(train[0]) <= h.num_val_prompts:
                where = h.train_path if h.source == "file" else f"{h.hf_dataset} (split train)"
                fix = "data.val_path" if h.source == "file" else "data.hf_val_split"
                raise ValueError(
                    f"{where} has {len(train[0])} prompts: too few to hold out {h.num_val_prompts} "
                    f"for validation; give {fix} or lower data.num_val_prompts"
                )
            train, val = _take(train, slice(None, -h.num_val_prompts)), _take(train, slice(-h.num_val_prompts, None))
        if h.max_train_prompts is not None:
            train = _take(train, slice(None, h.max_train_prompts))
        val = _take(val, slice(None, h.num_val_prompts))
        if not train[0] or not val[0]:
            raise ValueError(
                f"prompt source {h.source!r} gave {len(train[0])} training and {len(val[0])} validation prompts"
            )
        return train, val

    def _dataset_table(self, split: str) -> tuple[list, Columns]:
        """A split of a `datasets` dataset by hub name, local folder or local data file."""
        try:
            from datasets import load_dataset
        except ImportError as err:
            raise ImportError("source 'datasets' needs the datasets package: pip install -e '.[hub]'") from err
        h = self.hparams
        builders = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
        path = Path(h.hf_dataset)
        if path.is_file() and path.suffix in builders:
            splits = load_dataset(builders[path.suffix], data_files=str(path))
        else:
            splits = load_dataset(h.hf_dataset, h.hf_config)
        if split not in splits:
            raise ValueError(
                f"dataset {h.hf_dataset} has no split {split!r} (its splits: {', '.join(splits)}); set "
                "data.hf_val_split to one of them, or to null to hold out the last data.num_val_prompts of 'train'"
            )
        return split_columns(splits[split].to_dict(), h.prompt_column, f"dataset {h.hf_dataset} (split {split})")

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

    def _items(self, split: str, repeats: int = 1) -> tuple[list, Callable]:
        """What a split's loader draws from, and how a batch is made: prompts alone as a plain list
        (as always), prompts with columns as (prompt, {column: value}) rows collated into a PromptBatch."""
        prompts, columns = getattr(self, f"{split}_prompts"), self.columns.get(split) or {}
        if not columns:
            return prompts * repeats, list
        rows = [(p, {name: values[i] for name, values in columns.items()}) for i, p in enumerate(prompts)]
        return rows * repeats, PromptBatch.collate

    def train_dataloader(self) -> DataLoader:
        items, collate = self._items("train", self.hparams.epoch_repeats)
        ranks, rank = self._ranks()
        sampler = EpochShuffle(len(items), self.hparams.seed, self._epoch, self._items_done, ranks, rank)
        return DataLoader(items, batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=collate)

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
        items, collate = self._items("val")
        return DataLoader(items, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=collate)

    def test_dataloader(self) -> DataLoader:
        items, collate = self._items("test")
        ranks, rank = self._ranks()
        sampler = EachOnceSampler(items, num_replicas=ranks, rank=rank)
        return DataLoader(items, batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=collate)


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
