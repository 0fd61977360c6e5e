"""The per-step training log: one row of scalars per logged batch, written straight to the loggers.

A batch is logged when its optimizer steps pass a multiple of `log_every_n_steps`, with the
study's statistics of the window since the last row (metrics.EstimatorStudy). Validation rows of
a fit are written with `write_to_loggers` too, and go to `trainer.callback_metrics` through
`self.log`, where the callbacks read them; `validate` and `test` runs log through `self.log` alone.

The `step` column has one rule, here, which the module's rows and the resume's cut of metrics.csv
(runs/cli.py) both follow:

    training row     the batch's first optimizer step: the count of updates before the batch
    evaluation row   the count of updates of the weights it evaluated (`global_step`)

so a checkpoint taken at global step S holds the training rows < S and the evaluation rows <= S
(a validation due at S ends before the save, which runs.folders.LastCheckpoint defers).
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from torch import Tensor

from ..kl.correction import effective_sample_size
from ..kl.mismatch import engine_kl, logp_gap
from ..kl.objective import Objective
from .metrics import EstimatorStudy, kl_key, reward_key
from .rollout import Rollout
from .updater import BatchUpdate


def training_row_step(steps_before_batch: int) -> int:
    return steps_before_batch


def evaluation_row_step(global_step: int) -> int:
    return global_step


def row_held_by_checkpoint(row: Mapping[str, str], checkpoint_step: int) -> bool:
    """Whether a row of metrics.csv was written before a checkpoint taken at `checkpoint_step`."""
    if not row.get("step"):
        return True
    training = any(value and key.startswith("train/") for key, value in row.items())
    logged_at = int(float(row["step"]))
    return logged_at < checkpoint_step if training else logged_at <= checkpoint_step


def should_log(trainer: L.Trainer, first_step: int) -> bool:
    """Whether this batch's updates reached a multiple of log_every_n_steps (alike on every rank)."""
    every = trainer.log_every_n_steps
    return trainer.global_step // every > first_step // every or trainer.should_stop


def log_batch(
    module: L.LightningModule,
    study: EstimatorStudy,
    objective: Objective,
    rollout: Rollout,
    batch: BatchUpdate,
    step: int,
    lr: float,
) -> None:
    mask, sampled = rollout.samples.response_mask, batch.sampled
    n_tokens = mask.sum().clamp(min=1)
    losses = [piece.loss for piece in batch.pieces]
    scalars = {
        # Means over the batch's updates (and their micro-batches).
        "train/loss": torch.stack([part.loss.detach() for part in losses]).mean(),
        "train/policy_gradient_loss": torch.stack([part.policy_gradient for part in losses]).mean(),
        # What a reader takes for the penalty: beta x KL, with the RB value of the KL (the
        # surrogate's forward value is not a KL).
        "train/kl_penalty": objective.beta * sampled.values["rb"].mean(),
        "train/entropy": sampled.stats.entropy.detach().sum() / n_tokens,
        "train/response_length": mask.sum(1).float().mean(),
    }
    if objective.clip_range is not None:
        scalars["train/clip_fraction"] = torch.stack([part.clip_fraction for part in losses]).mean()
    if rollout.samples.engine_logp is not None:
        scalars.update(engine_scalars(rollout, sampled.stats.logp.detach()))
    trainer = module.trainer
    # One collective for all scalars: the mean over ranks.
    reduced = trainer.strategy.reduce(torch.stack(list(scalars.values())).float(), reduce_op="mean")
    logged = dict(zip(scalars, reduced, strict=True))
    logged["train/global_batch"] = torch.tensor(float(len(rollout.rewards) * trainer.world_size))
    logged["train/lr"] = torch.tensor(lr)
    logged.update(study.compute())
    write_to_loggers(module, logged, step)
    progress = {"reward": logged[reward_key("train", "mean")], "kl_rb": logged[kl_key("train", "rb", "mean")]}
    module.log_dict(progress, prog_bar=True, logger=False)


def engine_scalars(rollout: Rollout, logp: Tensor) -> dict[str, Tensor]:
    """An inference engine's sync time and how far its sampling distribution is from the policy's
    (kl/mismatch.py): `logp` [N, R] the trainer's log-probs of the sampled tokens."""
    samples = rollout.samples
    mask, engine_logp = samples.response_mask, samples.engine_logp
    return {
        "train/engine/sync_seconds": torch.tensor(float(samples.sync_seconds or 0.0), device=logp.device),
        "train/engine/logp_gap": logp_gap(engine_logp, logp, mask).float(),
        "train/engine/kl": engine_kl(engine_logp, logp, mask).mean().float(),
        # What sampling.engine_correction's sequence weights pi/mu would leave of the batch.
        "train/engine/ess": effective_sample_size(((logp - engine_logp) * mask).sum(-1)).float(),
    }


def write_to_loggers(module: L.LightningModule, metrics: dict[str, Tensor], step: int, flush: bool = False) -> None:
    """Metrics straight to the loggers at `step` (rank 0 writes); `flush` writes them to disk at once.

    They are global already, and self.log costs ~0.3 ms per key and step: with 40+ keys that
    was a third of a small model's training step.
    """
    values = dict(
        zip(metrics, torch.stack([v.float().to(module.device) for v in metrics.values()]).tolist(), strict=True)
    )  # one device-to-host copy
    values["epoch"] = module.current_epoch
    for logger in module.loggers:
        logger.log_metrics(values, step=step)
        if flush:
            logger.save()
