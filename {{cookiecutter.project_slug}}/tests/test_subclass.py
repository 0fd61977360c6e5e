"""The README's extension story: a task is a subclass that overrides score, encode_prompts or compute_loss."""

import csv
import dataclasses
from pathlib import Path

import pytest
import torch

from {{ cookiecutter.package_name }}.kl.objective import Objective
from {{ cookiecutter.package_name }}.training.data import PromptDataModule
from {{ cookiecutter.package_name }}.training.module import RBKLModule
from {{ cookiecutter.package_name }}.training.options import Sampling


class LengthTask(RBKLModule):
    """Rewards the length of a response in words, on prompts written as a movie review's opening."""

    def encode_prompts(self, prompts):
        ids, mask = super().encode_prompts([f"the movie {p}" for p in prompts])
        self.encoded.extend(self.tokenizer.batch_decode(ids, skip_special_tokens=True))
        return ids, mask

    def score(self, prompts, responses):
        self.scored.extend(responses)
        return torch.tensor([float(len(r.split())) for r in responses], device=self.device)

    def compute_loss(self, stats, rollout, objective, old_logp=None):
        parts = super().compute_loss(stats, rollout, objective, old_logp)
        self.losses.append(float(parts.loss.detach()))
        return parts


class WithItsOwnSettings(RBKLModule):
    """A subclass with an __init__ of its own that hands the option groups on, as objects."""

    def __init__(self, bonus: float = 1.0, **groups):
        super().__init__(**groups)
        self.bonus = bonus


def test_a_subclass_that_hands_groups_on_saves_them_as_dicts_and_trains(tiny_trainer):
    task = WithItsOwnSettings(bonus=2.0, objective=Objective(beta=0.2), sampling=Sampling(max_new_tokens=4))
    assert task.hparams["objective"] == dataclasses.asdict(Objective(beta=0.2)) and task.hparams["bonus"] == 2.0
    assert task.hparams_initial["sampling"]["max_new_tokens"] == 4, "hparams.yaml is written from this copy"
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(task, PromptDataModule(batch_size=4, epoch_repeats=5))
    assert trainer.global_step == 1
    assert "beta: 0.2" in (Path(trainer.logger.log_dir) / "hparams.yaml").read_text()


def test_a_subclass_formats_prompts_scores_responses_and_sees_every_loss(tiny_trainer):
    torch.manual_seed(0)
    task = LengthTask(sampling=Sampling(samples_per_prompt=2, max_new_tokens=6))
    task.encoded, task.scored, task.losses = [], [], []
    trainer = tiny_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(task, PromptDataModule(batch_size=4, epoch_repeats=5))

    assert len(task.encoded) >= 8 and all(text.startswith("the movie ") for text in task.encoded)
    rows = [r for r in csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")) if r.get("train/loss")]
    assert len(rows) == len(task.losses) == 2
    # The logged reward is the subclass's: the mean word count of each batch's 8 responses.
    lengths = [len(r.split()) for r in task.scored]
    expected = [sum(lengths[:8]) / 8, sum(lengths[8:16]) / 8]
    assert [float(r["train/reward/mean"]) for r in rows] == pytest.approx(expected)
    assert [float(r["train/loss"]) for r in rows] == pytest.approx(task.losses, rel=1e-5)
