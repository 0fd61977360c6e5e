"""Several optimizer steps per batch: PPO epochs, minibatches, micro-batches and clipping."""

import csv
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import Characters, Gradients

from {{ cookiecutter.package_name }}.kl.objective import Objective
from {{ cookiecutter.package_name }}.runs.folders import LastCheckpoint
from {{ cookiecutter.package_name }}.training.data import PromptDataModule
from {{ cookiecutter.package_name }}.training.module import RBKLModule
from {{ cookiecutter.package_name }}.training.options import Optimization, Sampling, Updates
from {{ cookiecutter.package_name }}.training.rewards import KeywordReward


def fit(tiny_trainer, module, batches: int, batch_size: int = 4, **trainer_kw) -> L.Trainer:
    L.seed_everything(0)
    steps = batches * module.updates.per_batch
    trainer = tiny_trainer(max_steps=steps, limit_val_batches=0, **trainer_kw)
    trainer.fit(module, PromptDataModule(batch_size=batch_size, epoch_repeats=50))
    return trainer


def logged(trainer: L.Trainer, key: str) -> list[tuple[int, float]]:
    rows = csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv"))
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def module(optimization: Optimization | None = None, reward=None, **groups) -> RBKLModule:
    torch.manual_seed(0)
    reward = KeywordReward(["good", "great"]) if reward is None else reward
    return RBKLModule(reward=reward, optimization=optimization or Optimization(lr=1e-2), **groups)


def test_every_update_is_a_step_and_the_batch_is_logged_once_at_its_first_step(tiny_trainer):
    trained = module(
        Optimization(lr=1e-2, lr_decay="linear"),
        updates=Updates(ppo_epochs=2, minibatches=2),
        objective=Objective(clip_range=0.2),
    )
    trainer = fit(tiny_trainer, trained, batches=3)
    assert trainer.global_step == 12  # 3 batches x 2 epochs x 2 minibatches
    assert [step for step, _ in logged(trainer, "train/reward/mean")] == [0, 4, 8]
    lrs = [lr for _, lr in logged(trainer, "train/lr")]
    # Linear decay over 12 optimizer steps, not over 3 batches.
    assert lrs == pytest.approx([1e-2, 1e-2 * 8 / 12, 1e-2 * 4 / 12])
    fractions = [f for _, f in logged(trainer, "train/clip_fraction")]
    assert all(0 <= f <= 1 for f in fractions) and max(fractions) > 0, "later epochs run off-policy and clip"


def test_micro_batches_accumulate_to_the_same_gradient(tiny_trainer):
    # Two pieces of whole prompt groups, each weighed by its share: the same gradient as one piece.
    gradients = []
    for micro_batches in (1, 2):
        seen = Gradients()
        fit(
            tiny_trainer,
            module(updates=Updates(micro_batches=micro_batches), sampling=Sampling(samples_per_prompt=2)),
            batches=1,
            callbacks=[seen],
        )
        gradients.append(seen.gradients[0])
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_gradient_clip_val_bounds_the_norm_of_every_update(tiny_trainer, clip):
    seen = Gradients()
    clipped = module(updates=Updates(gradient_clip_val=clip, ppo_epochs=2), reward=Characters())
    fit(tiny_trainer, clipped, batches=2, callbacks=[seen])
    norms = [g.norm().item() for g in seen.gradients]
    assert len(norms) == 4
    if clip is None:
        assert min(norms) > 1e-2
    else:
        assert max(norms) <= clip * (1 + 1e-4)


def test_off_policy_epochs_start_from_the_sampling_policy(tiny_trainer):
    # The batch's statistics are those of the weights that sampled: the same with 1 or 4 epochs.
    values = []
    for epochs in (1, 4):
        trained = module(updates=Updates(ppo_epochs=epochs))
        trainer = fit(tiny_trainer, trained, batches=1)
        values.append(logged(trainer, "train/kl/mc/mean")[0][1])
    assert values[0] == pytest.approx(values[1], abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"updates": {"ppo_epochs": 0}}, "ppo_epochs must be >= 1"),
        ({"updates": {"minibatches": 0}}, "minibatches must be >= 1"),
        ({"objective": {"clip_range": -0.1}}, "clip_range must be > 0"),
        ({"updates": {"gradient_clip_val": 0.0}}, "gradient_clip_val must be > 0"),
        ({"objective": {"kl_placement": "logits"}}, "kl_placement must be one of"),
        ({"updates": {"ppo_epoch": 2}}, "unknown updates setting.s. ppo_epoch; valid ones are ppo_epochs"),
    ],
)
def test_bad_update_settings_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RBKLModule(**kwargs)


@pytest.mark.parametrize(
    "kwargs, trainer_kw, match",
    [
        ({"minibatches": 3}, {}, "minibatches=3 does not divide a batch of 4 prompts"),
        ({"minibatches": 2, "micro_batches": 4}, {}, "micro_batches=4 does not divide a minibatch of 2"),
        ({}, {"accumulate_grad_batches": 2}, "trainer.accumulate_grad_batches is not used by this module"),
    ],
)
def test_splits_that_break_prompt_groups_are_refused_before_a_step(tiny_trainer, kwargs, trainer_kw, match):
    trainer = tiny_trainer(max_steps=1, limit_val_batches=0, **trainer_kw)
    with pytest.raises(ValueError, match=match):
        trainer.fit(module(updates=Updates(**kwargs)), PromptDataModule(batch_size=4))
    assert trainer.global_step == 0


def test_step_checkpoints_are_due_when_a_batch_passes_a_multiple_of_the_interval(tiny_trainer, tmp_path):
    # 4 optimizer steps per batch end batches at steps 4, 8, 12: a save every 6 steps falls due
    # at 8 (passing 6) and 12, though 8 is not a multiple of 6.
    saves = LastCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=6, save_top_k=-1)
    fit(tiny_trainer, module(updates=Updates(ppo_epochs=4)), batches=3, callbacks=[saves], enable_checkpointing=True)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=12.ckpt", "step=8.ckpt"]


def test_timed_saves_are_taken_at_batch_ends(tiny_trainer, tmp_path):
    # Lightning's ModelCheckpoint ignores train_time_interval under manual optimization; with an
    # interval of zero every batch end is due, and the deferral rules apply as to step saves.
    saves = LastCheckpoint(
        dirpath=tmp_path / "ckpt", filename="{step}", train_time_interval=timedelta(0), save_top_k=-1
    )
    fit(tiny_trainer, module(updates=Updates(ppo_epochs=2)), batches=3, callbacks=[saves], enable_checkpointing=True)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
