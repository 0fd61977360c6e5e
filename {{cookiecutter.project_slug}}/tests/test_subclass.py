"""The README's extension story: a task is a subclass that overrides score, encode_prompts or compute_loss."""

import csv
from pathlib import Path

import pytest
import torch

from {{ cookiecutter.package_name }}.data import PromptDataModule
from {{ cookiecutter.package_name }}.module import RBKLModule
from {{ cookiecutter.package_name }}.options import Sampling


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
