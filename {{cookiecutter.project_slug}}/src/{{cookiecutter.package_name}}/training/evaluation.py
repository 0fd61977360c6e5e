"""Validation and test, the KL evaluation: M samples per prompt, every estimator on the same samples.

A mixin of `RBKLModule`: the rollout and `model_step` of training without the loss, the statistics
per stage (`study`), and the rows a fit writes at the step of the weights they evaluated; also the
training-time gradient-variance measurement, which likewise measures without updating.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.trainer.states import TrainerFn

from .data import PromptBatch
from .grad_probe import grad_variance_due
from .log import evaluation_row_step, write_to_loggers
from .rollout import Rollout


class KLEvaluation:
    def evaluation_step(self, stage: str, batch: Any, batch_idx: int, samples_per_prompt: int) -> dict[str, Any]:
        """Validation and test: M samples per prompt, every estimator on the same samples."""
        with self.draws(stage, batch_idx):
            rollout = self.rollout(batch, samples_per_prompt)
        values = self.model_step(rollout, with_loss=False).values  # Lightning evaluates without grad
        self.study(stage).update(values, rollout.rewards, rollout.group_size, rollout.by_reward)
        if stage == "val" and self.updates.track_grad_variance:
            self.study(stage).update_grad_variance("spread", self.grad_variance(rollout, self.global_step))
        # Callbacks (the sample table) see the texts and this rank's per-sample values.
        return {
            "prompts": rollout.prompts,
            "responses": rollout.responses,
            "rewards": rollout.rewards,
            **{f"kl/{n}": v for n, v in values.items()},
        }

    def measure_grad_variance(self, rollout: Rollout) -> None:
        """updates.grad_variance_every_n_steps: at the training batch's sampling weights, before its updates,
        each prompt's gradient variances at the training group size (grad_probe.py, docs/estimators.md §10)."""
        every = self.updates.grad_variance_every_n_steps
        if every is None or not grad_variance_due(self.global_step, self.updates.per_batch, every):
            return
        # A second group per prompt from its own draws: training's samples and order stay as without it.
        with self.draws("grad_var"):
            second = self.rollout(PromptBatch(rollout.prompts, rollout.columns), rollout.group_size)
        for quantity, rows in self.grad_variance.at_training_size(rollout, second, self.global_step).items():
            self.study("train").update_grad_variance(quantity, rows)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self.evaluation_step("val", batch, batch_idx, self.sampling.val_samples_per_prompt)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
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
            write_to_loggers(self, metrics, evaluation_row_step(self.global_step), flush=True)
