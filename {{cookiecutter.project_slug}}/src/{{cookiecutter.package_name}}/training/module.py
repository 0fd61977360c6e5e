"""The LightningModule: KL-regularised RLOO fine-tuning of a policy against a frozen reference.

One default training step read top-down; no file below calls back into one above it:

    training/module.py     training_step -> rollout -> update -> model_step -> compute_loss ->
                           backward -> optimizer step (the loop's schedule: training/updater.py)
    training/rollout.py    prompts -> ids -> k samples each (models/sampler.py) -> texts -> rewards
    models/pair.py         policy and reference at the sampled positions: logits or hidden states
    kl/token_stats.py      per-token log-probs, exact KL and entropy, masked and checked
    kl/objective.py        the RLOO loss with its KL term (the surrogates in kl/estimators.py)
    training/log.py        the batch's row of metrics.csv and the `step` column's rule

Validation and `test` (the KL evaluation) run the rollout and `model_step` without the loss.
Subclass it for new tasks: override `score` (rewards), `encode_prompts` (prompt formatting) or
`compute_loss` (the objective); pass model names, not modules, so LightningCLI can build it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from ..kl.correction import ImportanceWeights, importance_weights
from ..kl.estimators import LOGGED_ESTIMATORS, all_kl_values
from ..kl.objective import LossParts, Objective, rloo_kl_loss
from ..kl.token_stats import TokenStats
from ..models.pair import ModelPair
from .checkpoint_state import load_trained_only, save_trained_only
from .data import PromptBatch, stage_prompts
from .evaluation import KLEvaluation
from .grad_probe import GradVarianceProbe
from .lightning_internals import attached_trainer, fitting, plain_hyperparameters, start_next_epoch_afresh
from .log import log_batch, should_log, training_row_step
from .metrics import STAGES, EstimatorStudy
from .optimizer import clip_gradient_norm, optimizer_and_schedule, planned_updates
from .options import LoRA, Optimization, Sampling, Updates, as_group
from .random_draws import batch_seed, seeded_draws
from .rewards import Reward, RewardFunction, Scores, as_reward
from .rollout import PromptEncoder, ResponseSampler, Rollout, rollout_prompts, score_responses
from .updater import BatchUpdate, micro_batches, minibatches

__all__ = ["RBKLModule", "Rollout", "StepOutput"]
# Frozen, so one instance can be every module's default.
DEFAULT_OBJECTIVE, DEFAULT_SAMPLING, DEFAULT_UPDATES = Objective(), Sampling(), Updates()
DEFAULT_OPTIMIZATION = Optimization()


@dataclass
class StepOutput:
    """What `model_step` computes at the current weights."""

    stats: TokenStats  # [N, R] per-token statistics
    mask: Tensor  # [N, R] bool, the response positions
    group_size: int
    loss: LossParts | None  # None when the step computes no loss (validation)
    weights: ImportanceWeights | None = None  # sampling.engine_correction: the samples came from mu

    @cached_property
    def values(self) -> dict[str, Tensor]:
        """Every logged KL estimator per sample [N], detached, computed when first read."""
        return all_kl_values(self.stats, self.mask, self.group_size, self.weights)

    @classmethod
    def joined(cls, pieces: list[StepOutput]) -> StepOutput:
        """Consecutive pieces of one batch as one (detached, no loss), estimated as one batch."""
        stats = TokenStats.cat([piece.stats for piece in pieces]).detach()
        weights = None if pieces[0].weights is None else ImportanceWeights.cat([piece.weights for piece in pieces])
        return cls(stats, torch.cat([piece.mask for piece in pieces]), pieces[0].group_size, None, weights)


class RBKLModule(KLEvaluation, L.LightningModule):
    def __init__(
        self,
        policy: str = "builtin:tiny-gpt2",
        reference: str | None = None,
        tokenizer: str | None = None,
        reward: Reward | RewardFunction | list[Reward | RewardFunction] | None = None,
        reward_weights: list[float] | None = None,
        dtype: Literal["float32", "bfloat16"] = "float32",
        trust_remote_code: bool = False,
        objective: Objective = DEFAULT_OBJECTIVE,
        sampling: Sampling = DEFAULT_SAMPLING,
        updates: Updates = DEFAULT_UPDATES,
        optimization: Optimization = DEFAULT_OPTIMIZATION,
        lora: LoRA | None = None,
    ):
        """
        Args:
            policy: the model to fine-tune: hub name, local folder, or builtin:tiny-gpt2[:seed=N].
            reference: the frozen model of the KL term (the teacher, for distillation); default: policy.
            tokenizer: tokenizer name or folder; default: policy.
            reward: a Reward (by class_path), a TRL-style function f(prompts, completions, **columns) (by its
                dotted path), or a list of them, each logged as train/reward/<name>/mean; None: no reward (pure KL).
            reward_weights: one weight per reward of the list (default 1 each); a None is left out of the sum.
            dtype: weights of policy and reference: "float32" or "bfloat16".
            trust_remote_code: allow code shipped with a checkpoint to run (off unless you trust it).
            objective: how the loss combines reward and KL (beta, kl_gradient, kl_placement, ...).
            sampling: how responses are drawn (samples_per_prompt, max_new_tokens, sampler, ...).
            updates: how a sampled batch becomes optimizer steps (ppo_epochs, minibatches, micro_batches, ...).
            optimization: AdamW and its learning-rate schedule (lr, weight_decay, warmup_steps, lr_decay).
            lora: train a LoRA adapter ({r, alpha, target_modules}); None: full fine-tuning.
        """
        super().__init__()
        # Each group is also accepted as a dict of its fields (what a checkpoint holds).
        self.objective = as_group(Objective, objective, "objective")
        self.sampling = as_group(Sampling, sampling, "sampling")
        self.updates = as_group(Updates, updates, "updates")
        self.optimization = as_group(Optimization, optimization, "optimization")
        self.lora = None if lora is None else as_group(LoRA, lora, "lora")
        self.save_hyperparameters(ignore=["reward"])
        # Checkpoints hold every group as a plain dict (whatever a subclass handed Lightning) for a resume.
        plain_hyperparameters(self, asdict)
        # Several optimizer steps per batch: the module steps the optimizer itself (updater.py).
        self.automatic_optimization = False
        self.pair = ModelPair.load(policy, reference, tokenizer, dtype, trust_remote_code, self.lora)
        self.policy, self.reference, self.tokenizer = self.pair.policy, self.pair.reference, self.pair.tokenizer
        self.reward = as_reward(reward, reward_weights)  # a model among them frozen
        self.train()  # every model in eval mode from the start, not only after Lightning's first switch
        s, context = self.sampling, self.pair.context_length()
        self.prompt_encoder = PromptEncoder(
            self.tokenizer, s.max_new_tokens, context, s.chat_template, tokenizer or policy
        )
        self.sampler = ResponseSampler(self.policy, self.tokenizer, self.pair.stop_ids, s)
        self.pair.fuses(self.updates.fused_lm_head, rows=0)  # a head it cannot fuse refused now, not at the first step
        track = self.updates.grad_variance_measured  # {stage: the gradient-variance quantities measured}
        self.studies = nn.ModuleDict(  # keyed "<stage>_study": a key may not shadow a Module attribute (train)
            {f"{stage}_study": EstimatorStudy(stage, LOGGED_ESTIMATORS, track.get(stage, ())) for stage in STAGES}
        )
        probe = GradVarianceProbe(self.pair, self.objective.beta, self.updates.grad_variance_contrasts, self.sampling)
        self.grad_variance = probe if track else None
        # Checkpoints hold the policy only: the reference and reward are rebuilt from the config.
        self.strict_loading = False
        # The seed seed_everything set (LightningCLI seeds before building the module); a resumed
        # run takes the checkpoint's, so that it continues the same draws (random_draws.py).
        self.run_seed = torch.initial_seed()

    @property
    def stop_ids(self) -> list[int]:
        return self.pair.stop_ids

    @property
    def sharded(self) -> bool:
        trainer = attached_trainer(self)
        return trainer is not None and isinstance(trainer.strategy, FSDPStrategy)

    def train(self, mode: bool = True):
        # Sampling and the training forward must see one distribution: every model stays in eval
        # mode (dropout is 0 too). Lightning 2.6 does not call this during fit: __init__ does.
        super().train(mode)
        self.pair.eval()
        if isinstance(self.reward, nn.Module):
            self.reward.eval()
        return self

    # -- checkpoints ---------------------------------------------------------------------------

    def checkpointed_keys(self) -> list[str]:
        """The state-dict keys a checkpoint holds: the policy's (with LoRA, only the adapter's)."""
        return [f"policy.{name}" for name in self.pair.trained_names()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        start_next_epoch_afresh(checkpoint)
        save_trained_only(checkpoint, self.checkpointed_keys(), self.run_seed)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys, rebuilt = self.checkpointed_keys(), self.state_dict()
        self.run_seed = load_trained_only(checkpoint, keys, rebuilt, self.run_seed, fitting=fitting(self))

    def draws(self, stage: str, batch_idx: int = 0):
        """The random draws of one batch, a function of (run seed, rank, stage, step, batch) only."""
        seed = batch_seed(self.run_seed, self.global_rank, stage, self.global_step, batch_idx)
        return seeded_draws(seed, self.device)

    # -- checks that need more than one option ---------------------------------------------------

    def configure_callbacks(self) -> list[L.Callback]:
        # The first hook with the trainer attached, before Lightning's own check of its flags (whose
        # advice does not apply here). A subclass returning callbacks calls super() first.
        self.check_trainer(self.trainer)
        return []

    def check_trainer(self, trainer: L.Trainer) -> None:
        """The trainer's flags against the options: refused before the first step."""
        self.updates.check_trainer(trainer)
        self.pair.fuses(self.updates.fused_lm_head, rows=0, sharded=isinstance(trainer.strategy, FSDPStrategy))

    def setup(self, stage: str) -> None:
        # Every prompt checked before the first step, not when its batch comes up.
        data = self.trainer.datamodule
        prompts, batch_size = stage_prompts(data, stage), getattr(data, "hparams", {}).get("batch_size")
        if stage == "fit" and batch_size is not None:
            self.updates.check_batch_size(batch_size)
        for start in range(0, len(prompts), 256):
            self.encode_prompts(prompts[start : start + 256])
        self.prompt_encoder.warn_unknown_words(prompts)

    # -- one training step, top-down ------------------------------------------------------------

    def training_step(self, batch: list[str], batch_idx: int) -> dict[str, Tensor]:
        first_step = self.global_step
        with self.draws("train"):  # the samples and the minibatch order
            rollout = self.rollout(batch, self.sampling.samples_per_prompt)
            self.measure_grad_variance(rollout)  # every N steps with updates.grad_variance_every_n_steps
            lr = self.optimizers().param_groups[0]["lr"]  # of the batch's first update
            update = self.update(rollout)
        self.study("train").update(update.sampled.values, rollout.rewards, rollout.group_size, rollout.by_reward)
        if should_log(self.trainer, first_step):
            log_batch(self, self.study("train"), self.objective, rollout, update, training_row_step(first_step), lr)
        # Callbacks see this rank's per-sample values in on_train_batch_end.
        return {"rewards": rollout.rewards, **{f"kl/{n}": v for n, v in update.sampled.values.items()}}

    def rollout(self, prompts: Sequence[str] | PromptBatch, k: int) -> Rollout:
        """Sample k responses per prompt and score them: once per batch, whatever the updates."""
        batch = PromptBatch.of(prompts)  # the prompts, and the dataset's other columns if it has any
        ids, mask = self.encode_prompts(batch.prompts)
        # Sharded weights are gathered layer by layer in every forward: ranks that finish early
        # must keep stepping until all are done, or the others wait forever.
        samples = self.sampler(ids, mask, k, synced=self.sharded)
        responses = self.sampler.decode(samples)
        return Rollout.scored(batch, samples, self.score(rollout_prompts(batch, k, samples), responses), k, responses)

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids [B, P] and mask [B, P] bool; refuses prompts that cannot fit."""
        return self.prompt_encoder(prompts, self.device)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor | Scores:
        """Rewards [N] for repeated prompts (their columns in `prompts.columns`) and responses; a list's Scores."""
        return score_responses(self.reward, prompts, responses, self.device)

    def update(self, rollout: Rollout) -> BatchUpdate:
        """ppo_epochs x minibatches optimizer steps on one sampled batch (training/updater.py)."""
        sampled = None
        if self.updates.per_batch > 1:
            # Statistics of the policy that sampled, and its log-probs for the importance ratios.
            with torch.no_grad():
                sampled = self.model_step(rollout, with_loss=False)
        old_logp = None if sampled is None else sampled.stats.logp.sum(-1)  # [N]
        pieces = [
            piece
            for prompts in minibatches(len(rollout.prompts), self.updates)
            for piece in self.optimizer_update(rollout, prompts, old_logp)
        ]
        # One update: it ran at the sampling weights, so its pieces are the batch's statistics (rho = 1).
        return BatchUpdate(sampled or StepOutput.joined(pieces), pieces)

    def optimizer_update(self, rollout: Rollout, prompts: Tensor, old_logp: Tensor | None) -> list[StepOutput]:
        """One optimizer step on the groups of `prompts`, backward in micro-batches."""
        optimizer, pieces, outputs = self.optimizers(), micro_batches(prompts, self.updates), []
        # Under DDP only the last piece's backward all-reduces; the others accumulate locally.
        block_sync = getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)
        for i, (piece, weight) in enumerate(pieces):
            with contextlib.nullcontext() if i == len(pieces) - 1 else block_sync():
                part_old = None if old_logp is None else old_logp[rollout.rows(piece)]
                out = self.model_step(rollout.select(piece), old_logp=part_old)
                self.manual_backward(out.loss.loss * weight)
            outputs.append(out)
        if self.updates.gradient_clip_val is not None:
            clip_gradient_norm(self, optimizer, self.updates.gradient_clip_val, self.sharded)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        return outputs

    def model_step(self, rollout: Rollout, *, with_loss: bool = True, old_logp: Tensor | None = None) -> StepOutput:
        """What depends on the current weights: token statistics, every estimate, the loss (training,
        validation, benchmarks/step.py); `old_logp` [N]: the sampling policy's, once the weights moved."""
        kl_grad, u, mask = with_loss and self.objective.needs_kl_grad, self.updates, rollout.samples.response_mask
        stats = self.pair.token_stats(rollout.samples, kl_grad, u.kl_chunk_rows, u.fused_lm_head, self.sharded)
        loss = self.compute_loss(stats, rollout, self.objective, old_logp) if with_loss else None
        return StepOutput(stats, mask, rollout.group_size, loss, self.importance_weights(stats, rollout))

    def compute_loss(
        self, stats: TokenStats, rollout: Rollout, objective: Objective, old_logp: Tensor | None = None
    ) -> LossParts:
        mask, weights = rollout.samples.response_mask, self.importance_weights(stats, rollout)
        return rloo_kl_loss(stats, mask, rollout.rewards, rollout.group_size, objective, old_logp, weights)

    def importance_weights(self, stats: TokenStats, rollout: Rollout) -> ImportanceWeights | None:
        """pi/mu of the engine's samples at the current weights (sampling.engine_correction); None: none."""
        samples, s = rollout.samples, self.sampling
        return importance_weights(
            stats.logp, samples.engine_logp, samples.response_mask, s.engine_correction, s.engine_correction_cap
        )

    def study(self, stage: str) -> EstimatorStudy:
        """The statistics of a stage (train, val, test): updated per step, logged by compute()."""
        return self.studies[f"{stage}_study"]

    def configure_optimizers(self):
        total = planned_updates(self.trainer, self.updates.per_batch)
        return optimizer_and_schedule(self.policy, self.optimization, total)
