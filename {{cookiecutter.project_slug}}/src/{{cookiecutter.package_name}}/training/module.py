"""The LightningModule: KL-regularised RLOO fine-tuning of a policy against a frozen reference.

It composes, and each part lives in its own file (docs/estimators.md §4-8):

    pair        model_pair.ModelPair     policy and reference: loading, logits, token statistics
    rollout     rollout.py               prompts -> k samples each from the policy -> rewards
                                                                                (once per batch)
    model_step  below                    what depends on the current weights: per-token
                                         statistics, every KL estimate, the loss (objective.py)
    updater     updater.Updater          ppo_epochs x minibatches optimizer steps per batch,
                                         micro-batches, clipping; the statistics at the weights
                                         that sampled
    log         training_log.py          the per-step row; metrics.EstimatorStudy the statistics
                                         of each estimator, grouped by prompt

Validation and `test` (the KL evaluation) run the rollout and `model_step` without the loss.
Subclass it for new tasks: override `score` (rewards), `encode_prompts` (prompt formatting) or
`compute_loss` (the objective); pass model names, not modules, so LightningCLI can build it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from ..kl.estimators import LOGGED_ESTIMATORS, all_kl_values
from ..kl.objective import LossParts, Objective, StepOutput, rloo_kl_loss
from ..kl.token_stats import TokenStats
from ..models.loading import freeze
from ..models.pair import ModelPair
from .checkpoint_state import check_grouped, check_holds, fill_left_out, keep_only
from .grad_probe import GradVarianceProbe
from .lightning_internals import attached_trainer, plain_hyperparameters, start_next_epoch_afresh
from .log import log_batch, should_log, write_to_loggers
from .metrics import STAGES, EstimatorStudy
from .options import LoRA, Optimization, Sampling, Updates, as_group
from .random_draws import batch_seed, seeded_draws
from .rewards import Reward, RewardFunction, as_reward
from .rollout import PromptEncoder, ResponseSampler, Rollout, score_responses
from .schedules import lr_lambda
from .updater import Updater

__all__ = ["RBKLModule", "Rollout", "StepOutput"]
# Frozen, so one instance can be every module's default.
DEFAULT_OBJECTIVE, DEFAULT_SAMPLING, DEFAULT_UPDATES = Objective(), Sampling(), Updates()
DEFAULT_OPTIMIZATION = Optimization()


class RBKLModule(L.LightningModule):
    def __init__(
        self,
        policy: str = "builtin:tiny-gpt2",
        reference: str | None = None,
        tokenizer: str | None = None,
        reward: Reward | RewardFunction | None = None,
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
            reward: a Reward (prompts, responses) -> Tensor[N], set by class_path, or a TRL-style function
                reward(prompts, completions, **kwargs) -> list[float] by its dotted path; None: no reward (pure KL).
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
        # Checkpoints and hparams.yaml hold every group as a plain dict (a subclass's own __init__
        # may have handed Lightning the objects), which a resume and load_from_checkpoint pass back.
        plain_hyperparameters(self, asdict)
        self.accepts_flat_checkpoint = False  # train.py sets it once it moved an old checkpoint's options
        # Several optimizer steps per batch: the module steps the optimizer itself (updater.py).
        self.automatic_optimization = False
        self.pair = ModelPair.load(policy, reference, tokenizer, dtype, trust_remote_code, self.lora)
        self.policy, self.reference, self.tokenizer = self.pair.policy, self.pair.reference, self.pair.tokenizer
        reward = as_reward(reward)
        self.reward = freeze(reward) if isinstance(reward, nn.Module) else reward
        self.train()  # every model in eval mode from the start, not only after Lightning's first switch
        s, context = self.sampling, self.pair.context_length()
        self.prompt_encoder = PromptEncoder(
            self.tokenizer, s.max_new_tokens, context, s.chat_template, tokenizer or policy
        )
        self.sampler = ResponseSampler(self.policy, self.tokenizer, self.pair.stop_ids, s)
        self.updater = Updater(self, self.updates)
        if self.updates.fused_lm_head:
            self.pair.check_linear_heads()  # refused now, not at the first step
        # Keyed "<stage>_study": a ModuleDict key may not shadow a Module attribute such as train.
        track = self.updates.track_grad_variance
        self.studies = nn.ModuleDict(
            {f"{stage}_study": EstimatorStudy(stage, LOGGED_ESTIMATORS, track and stage == "val") for stage in STAGES}
        )
        self.grad_variance = (
            GradVarianceProbe(self.pair, self.objective.beta, self.updates.grad_variance_contrasts) if track else None
        )
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

    @property
    def updates_per_batch(self) -> int:
        return self.updates.per_batch

    def train(self, mode: bool = True):
        # Sampling and the training forward must see the same distribution, so every model
        # stays in eval mode (dropout is also set to 0 on load). Lightning 2.6 does not call
        # this during fit (it only restores modes around validation): __init__ calls it.
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
        checkpoint["run_seed"] = self.run_seed
        start_next_epoch_afresh(checkpoint)
        keep_only(checkpoint, self.checkpointed_keys())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_holds(checkpoint, self.checkpointed_keys())
        fill_left_out(checkpoint, self.state_dict())
        check_grouped(checkpoint.get("hyper_parameters", {}), self.accepts_flat_checkpoint)
        self.run_seed = checkpoint.get("run_seed", self.run_seed)

    def draws(self, stage: str, batch_idx: int = 0):
        """The random draws of one batch, a function of (run seed, rank, stage, step, batch) only."""
        seed = batch_seed(self.run_seed, self.global_rank, stage, self.global_step, batch_idx)
        return seeded_draws(seed, self.device)

    # -- checks that need more than one option ---------------------------------------------------

    def configure_callbacks(self) -> list[L.Callback]:
        # The first hook of fit, validate and test with the trainer attached, and before
        # Lightning's own check of the trainer's flags, whose advice (switch to automatic
        # optimization) does not apply here: a plain trainer.fit gets the same sentence as the CLI.
        # A subclass that returns its own callbacks calls super().configure_callbacks() first.
        self.check_trainer(self.trainer)
        return []

    def check_trainer(self, trainer: L.Trainer) -> None:
        """Lightning's own accumulation and clipping do not apply to a module that steps itself."""
        if self.updates.fused_lm_head and isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "updates.fused_lm_head needs the LM head's whole weight, which FSDP shards: set "
                "model.init_args.updates.fused_lm_head: false (or leave it unset)"
            )
        if self.updates.track_grad_variance and isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "updates.track_grad_variance differentiates the policy's own parameters outside FSDP's forward, "
                "which shards them: set model.init_args.updates.track_grad_variance: false under FSDP"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "trainer.accumulate_grad_batches is not used by this module, which steps its optimizer itself: "
                "set model.init_args.updates.micro_batches (gradient accumulation over whole prompt groups) instead"
            )
        if trainer.gradient_clip_val is not None:
            raise ValueError(
                "trainer.gradient_clip_val is not used by this module, which steps its optimizer itself: set "
                "model.init_args.updates.gradient_clip_val instead"
            )

    def setup(self, stage: str) -> None:
        # Every prompt checked before the first step, not when its batch comes up.
        data = self.trainer.datamodule
        names = {"fit": ("train_prompts", "val_prompts"), "validate": ("val_prompts",), "test": ("test_prompts",)}
        prompts = [p for name in names.get(stage, ()) for p in getattr(data, name, [])]
        batch_size = getattr(data, "hparams", {}).get("batch_size")
        if stage == "fit" and batch_size is not None:
            self.updates.check_batch_size(batch_size)
        for start in range(0, len(prompts), 256):
            self.encode_prompts(prompts[start : start + 256])
        self.prompt_encoder.warn_unknown_words(prompts)

    # -- the step ------------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids [B, P] and mask [B, P] bool; refuses prompts that cannot fit."""
        return self.prompt_encoder(prompts, self.device)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        """Rewards [N] for repeated prompts and their responses (zeros without a reward)."""
        return score_responses(self.reward, prompts, responses, self.device)

    def rollout(self, prompts: Sequence[str], k: int) -> Rollout:
        """Sample k responses per prompt and score them: once per batch, whatever the updates."""
        ids, mask = self.encode_prompts(prompts)
        # Sharded weights are gathered layer by layer in every forward: ranks that finish early
        # must keep stepping until all are done, or the others wait forever.
        samples = self.sampler(ids, mask, k, synced=self.sharded)
        repeated = [p for p in prompts for _ in range(k)]
        responses = self.sampler.decode(samples)
        return Rollout(list(prompts), samples, self.score(repeated, responses), k, responses)

    def compute_loss(
        self, stats: TokenStats, rollout: Rollout, objective: Objective, old_logp: Tensor | None = None
    ) -> LossParts:
        mask = rollout.samples.response_mask
        return rloo_kl_loss(stats, mask, rollout.rewards, rollout.group_size, objective, old_logp)

    def model_step(self, rollout: Rollout, *, with_loss: bool = True, old_logp: Tensor | None = None) -> StepOutput:
        """What depends on the current weights: log-probs, KL statistics, every estimate, the loss.

        Shared by training, validation and benchmarks/step.py; `old_logp` [N] are the sampling
        policy's log-probabilities once the weights have moved (updater.py).
        """
        kl_grad, u = with_loss and self.objective.needs_kl_grad, self.updates
        fused = False if self.sharded else u.fused_lm_head  # FSDP: the head's weight is in shards
        stats = self.pair.token_stats(rollout.samples, kl_grad, u.kl_chunk_rows, fused=fused)
        loss = self.compute_loss(stats, rollout, self.objective, old_logp) if with_loss else None
        return StepOutput(stats, all_kl_values(stats, rollout.samples.response_mask, rollout.group_size), loss)

    # -- stages --------------------------------------------------------------------------------

    def training_step(self, batch: list[str], batch_idx: int) -> dict[str, Tensor]:
        first_step = self.global_step
        with self.draws("train"):  # the samples and the minibatch order
            rollout = self.rollout(batch, self.sampling.samples_per_prompt)
            lr = self.optimizers().param_groups[0]["lr"]  # of the batch's first update
            update = self.updater(rollout)
        self.study("train").update(update.sampled.values, rollout.rewards, rollout.group_size)
        if should_log(self.trainer, first_step):
            log_batch(self, self.study("train"), self.objective, rollout, update, first_step, lr)
        # Callbacks see this rank's per-sample values in on_train_batch_end.
        return {"rewards": rollout.rewards, **{f"kl/{n}": v for n, v in update.sampled.values.items()}}

    def evaluation_step(self, stage: str, batch: list[str], batch_idx: int, samples_per_prompt: int) -> dict[str, Any]:
        """Validation and test: M samples per prompt, every estimator on the same samples."""
        with self.draws(stage, batch_idx):
            rollout = self.rollout(batch, samples_per_prompt)
        values = self.model_step(rollout, with_loss=False).values  # Lightning evaluates without grad
        self.study(stage).update(values, rollout.rewards, rollout.group_size)
        if stage == "val" and self.grad_variance is not None:
            self.study(stage).grad_variance.update(self.grad_variance(rollout, self.global_step))
        # Callbacks (the sample table) see the texts and this rank's per-sample values.
        return {
            "prompts": rollout.prompts,
            "responses": rollout.responses,
            "rewards": rollout.rewards,
            **{f"kl/{n}": v for n, v in values.items()},
        }

    def validation_step(self, batch: list[str], batch_idx: int) -> dict[str, Any]:
        return self.evaluation_step("val", batch, batch_idx, self.sampling.val_samples_per_prompt)

    def test_step(self, batch: list[str], batch_idx: int) -> dict[str, Any]:
        return self.evaluation_step("test", batch, batch_idx, self.sampling.test_samples_per_prompt)

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self.log_evaluation("test")

    def log_evaluation(self, stage: str) -> None:
        metrics = self.study(stage).compute()
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        # Callbacks and checkpoint monitors read them from callback_metrics; `validate` and `test`
        # runs also return them and print Lightning's table.
        self.log_dict(metrics, logger=not fitting)
        if fitting and not self.trainer.sanity_checking:
            # The row at the optimizer step of the weights it evaluated, the training rows' x-axis
            # (Lightning's would be a count of batches, less one: another axis with several updates
            # per batch, and one by which a resume could not cut metrics.csv). Written at once, as
            # Lightning writes its own: the save that waits for this validation holds its row.
            write_to_loggers(self, metrics, self.global_step, flush=True)

    def study(self, stage: str) -> EstimatorStudy:
        """The statistics of a stage (train, val, test): updated per step, logged by compute()."""
        return self.studies[f"{stage}_study"]

    # -- optimisation --------------------------------------------------------------------------

    def configure_optimizers(self):
        o = self.optimization
        # Only the policy's trainable weights: self.parameters() would include the reference.
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = adamw(params, lr=o.lr, weight_decay=o.weight_decay)
        # Lightning estimates batches, capped by max_steps (which counts optimizer steps).
        batches, max_steps = self.trainer.estimated_stepping_batches, self.trainer.max_steps
        total = int(batches) * self.updates_per_batch if batches != float("inf") else None
        if total is not None and max_steps != -1:
            total = min(total, max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.warmup_steps, total, o.lr_decay))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def adamw(params: list[torch.Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per parameter where torch has one (CPU and CUDA): the for-loop
    and foreach versions allocate temporaries of the weights' size (two per weight, or one of all
    weights at once), which at a 150k vocabulary made the update the peak of a fused-head step."""
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
