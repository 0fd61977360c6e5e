"""Validation and test, the KL evaluation: M samples per prompt, every estimator on the same samples.

A mixin of `RBKLModule`: the rollout and `model_step` of training without the loss, the statistics
per stage (`study`), and the rows a fit writes at the step of the weights they evaluated.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.trainer.states import TrainerFn

from .log import evaluation_row_step, write_to_loggers


class KLEvaluation:
    def evaluation_step(self, stage: str, batch: Any, batch_idx: int, samples_per_prompt: int) -> dict[str, Any]:
        """Validation and test: M samples per prompt, every estimator on the same samples."""
        with self.draws(stage, batch_idx):
            rollout = self.rollout(batch, samples_per_prompt)
        values = self.model_step(rollout, with_loss=False).values  # Lightning evaluates without grad
        self.study(stage).update(values, rollout.rewards, rollout.group_size, rollout.by_reward)
        if stage == "val" and self.grad_variance is not None:
            self.study(stage).grad_variance.update(self.grad_variance(rollout, self.global_step))
        # Callbacks (the sample table) see the texts and this rank's per-sample values.
        return {
            "prompts": rollout.prompts,
            "responses": rollout.responses,
            "rewards": rollout.rewards,
            **{f"kl/{n}": v for n, v in values.items()},
        }

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
