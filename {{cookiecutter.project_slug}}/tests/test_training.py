"""Training end to end on tiny models: learning, frozen reference, optimizer, checkpoints, errors."""

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from {{ cookiecutter.package_name }}.kl.objective import Objective
from {{ cookiecutter.package_name }}.kl.token_stats import token_stats
from {{ cookiecutter.package_name }}.training.data import PromptDataModule
from {{ cookiecutter.package_name }}.training.module import RBKLModule
from {{ cookiecutter.package_name }}.training.options import Optimization, Sampling
from {{ cookiecutter.package_name }}.training.rewards import KeywordReward, Reward


def fit(tiny_trainer, module, steps: int, batch_size: int = 8, **trainer_kw) -> L.Trainer:
    L.seed_everything(0)
    trainer = tiny_trainer(max_steps=steps, limit_val_batches=0, **trainer_kw)
    trainer.fit(module, PromptDataModule(batch_size=batch_size, epoch_repeats=50))
    return trainer


def logged(trainer: L.Trainer, key: str) -> list[float]:
    rows = csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv"))
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.slow
def test_a_short_run_on_a_learnable_reward_raises_the_reward(tiny_trainer, tmp_path):
    torch.manual_seed(0)
    module = RBKLModule(
        reward=KeywordReward(["good", "great"]),
        optimization=Optimization(lr=3e-3),
        objective=Objective(beta=0.05),
        sampling=Sampling(samples_per_prompt=4),
    )
    reference_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    trainer = fit(tiny_trainer, module, steps=40, enable_checkpointing=True)

    rewards, kl = logged(trainer, "train/reward/mean"), logged(trainer, "train/kl/rb/mean")
    assert len(rewards) == 40
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.5, (first, last)
    assert kl[0] < 1e-6 < kl[-1], "the policy starts at the reference and moves away from it"

    for key, value in module.reference.state_dict().items():
        assert torch.equal(value, reference_before[key]), f"reference weight {key} changed"
    optimizer_params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimizer_params == {id(p) for p in module.policy.parameters()}
    assert not any(p.requires_grad for p in module.reference.parameters())

    checkpoint = torch.load(next(Path(tmp_path).rglob("*.ckpt")), weights_only=False)
    assert checkpoint["state_dict"] and all(k.startswith("policy.") for k in checkpoint["state_dict"])


def test_mc_gradient_trains_too_and_the_schedule_is_logged(tiny_trainer):
    module = RBKLModule(
        reward=KeywordReward(["good"]),
        objective=Objective(kl_gradient="mc"),
        optimization=Optimization(lr=1e-3, warmup_steps=2),
    )
    trainer = fit(tiny_trainer, module, steps=3, enable_checkpointing=False)
    assert len(logged(trainer, "train/kl/mc/within_prompt_var")) == 3
    assert logged(trainer, "train/lr") == pytest.approx([5e-4, 1e-3, 1e-3])


def test_policy_and_reference_must_share_a_vocabulary(hf_checkpoints):
    with pytest.raises(ValueError, match="different vocabularies"):
        RBKLModule(policy=str(hf_checkpoints["gpt2"]), reference=str(hf_checkpoints["gpt2_other_vocab"]))


class NaNReward(Reward):
    def __call__(self, prompts, responses):
        return torch.tensor([float("nan") if i == 1 else 0.0 for i in range(len(responses))])


def test_a_non_finite_reward_names_the_text(tiny_trainer):
    module = RBKLModule(reward=NaNReward())
    with pytest.raises(ValueError, match=r"non-finite reward nan for prompt '.+' and response"):
        fit(tiny_trainer, module, steps=1, enable_checkpointing=False)


def test_a_prompt_longer_than_the_context_is_refused():
    module = RBKLModule(sampling=Sampling(max_new_tokens=60))  # the builtin model has 64 positions
    with pytest.raises(ValueError, match="exceeds the model's context of 64 tokens"):
        module.encode_prompts(["the movie was good and the plot was fine"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampling": {"samples_per_prompt": 1}}, "samples_per_prompt must be >= 2"),
        ({"objective": {"beta": -1.0}}, "beta must be >= 0"),
        ({"policy": "builtin:nope"}, "unknown builtin model"),
        ({"dtype": "float16"}, "dtype must be one of"),
    ],
)
def test_bad_module_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RBKLModule(**kwargs)


class LengthReward(Reward):
    """Varies from sample to sample, so the first step already has a non-zero gradient."""

    def __call__(self, prompts, responses):
        return torch.tensor([float(len(r.split())) for r in responses])


def test_bfloat16_weights_train_a_step(tiny_trainer):
    module = RBKLModule(reward=LengthReward(), dtype="bfloat16", optimization=Optimization(lr=1e-2))
    assert next(module.policy.parameters()).dtype == torch.bfloat16
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = fit(tiny_trainer, module, steps=1, enable_checkpointing=False)
    assert all(torch.isfinite(torch.tensor(logged(trainer, key))).all() for key in ("train/loss", "train/kl/rb/mean"))
    changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and next(module.policy.parameters()).dtype == torch.bfloat16, "one bf16 update took place"


class WeightsAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.clone() for k, v in pl_module.policy.state_dict().items()}


@pytest.mark.slow
def test_training_resumes_from_the_last_checkpoint(tiny_trainer, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from {{ cookiecutter.package_name }}.reports.callbacks import RewardVsKLPlot

    def trainer(epochs):
        callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), RewardVsKLPlot()]
        return tiny_trainer(max_epochs=epochs, callbacks=callbacks, limit_train_batches=2)

    L.seed_everything(0)
    first = trainer(1)
    module = RBKLModule(
        reward=KeywordReward(["good"]), optimization=Optimization(lr=3e-3), sampling=Sampling(val_samples_per_prompt=2)
    )
    first.fit(module, PromptDataModule(batch_size=8))
    trained = {k: v.clone() for k, v in module.policy.state_dict().items()}

    second = trainer(2)
    resumed = RBKLModule(
        reward=KeywordReward(["good"]), optimization=Optimization(lr=3e-3), sampling=Sampling(val_samples_per_prompt=2)
    )
    probe = WeightsAtStart()
    second.callbacks.append(probe)
    second.fit(resumed, PromptDataModule(batch_size=8), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert all(torch.equal(probe.weights[k], trained[k]) for k in trained), "the policy weights must be restored"
    assert second.global_step == 4
    plot = next(c for c in second.callbacks if isinstance(c, RewardVsKLPlot))
    assert [h["epoch"] for h in plot.history] == [0.0, 1.0], "the plot history survives the resume"


class RolloutRecorder(RBKLModule):
    """Keeps every rollout, as a subclass that inspects its samples would."""

    def rollout(self, prompts, k):
        rollout = super().rollout(prompts, k)
        self.rollouts.append(rollout)
        return rollout


def test_bf16_mixed_step_logs_the_rb_kl_of_its_own_logits(tiny_trainer):
    # Under bf16 autocast the LM heads return bf16 logits; the KL computed from them must be the
    # float32 KL of those very logits, not a bf16 rounding of its large cancelling terms.
    module = RolloutRecorder(reward=KeywordReward(["good"]), sampling=Sampling(samples_per_prompt=4))
    module.rollouts, heads = [], []
    for model in (module.policy, module.reference):
        model.lm_head.register_forward_hook(lambda head, args, out: heads.append(out.detach().clone()))
    with torch.no_grad():  # a reference away from the policy, so the KL is not 0
        module.reference.transformer.ln_f.bias.add_(3.0)
    trainer = fit(tiny_trainer, module, steps=1, enable_checkpointing=False, precision="bf16-mixed")
    samples = module.rollouts[0].samples
    tokens, mask = samples.response, samples.response_mask
    policy, ref = heads[-2:]  # after sampling: the training forward of the policy, then the reference's
    assert policy.shape[:2] == tokens.shape and ref.shape == policy.shape
    assert policy.dtype == torch.bfloat16, "autocast was on: the LM head ran in bf16"
    stats = token_stats(policy.float(), ref.float(), tokens.masked_fill(~mask, 0), kl_grad=False)
    per_sample = (stats.kl * mask).sum(-1).double()  # [N]
    expected = per_sample.reshape(-1, 4).mean(1).mean().item()
    assert logged(trainer, "train/kl/rb/mean")[0] == pytest.approx(expected, rel=1e-5, abs=1e-6)


class ModeRecorder(RBKLModule):
    def training_step(self, batch, batch_idx):
        self.modes.append([m.training for m in (*self.policy.modules(), *self.reference.modules())])
        return super().training_step(batch, batch_idx)


def test_every_model_is_in_eval_mode_during_training_steps(tiny_trainer):
    # The built-in policy is built in train mode; Lightning 2.6 never calls train() during fit.
    module = ModeRecorder(reward=KeywordReward(["good"]))
    module.modes = []
    fit(tiny_trainer, module, steps=2, enable_checkpointing=False)
    assert len(module.modes) == 2 and not any(any(step) for step in module.modes)
