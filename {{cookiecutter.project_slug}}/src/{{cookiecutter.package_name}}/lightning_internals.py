"""Every use of a Lightning name that Lightning does not document as public, in one place.

Exact resume needs a few of them: a CSV writer that appends, step checkpoints due when a batch of
several optimizer steps passes a multiple of the interval, the loop's count of finished batches
in a restarted epoch, and a CLI that lets explicit values win over a checkpoint's. pyproject pins
Lightning to the minor release these were checked on, and tests/test_lightning_internals.py
fails when one of them is renamed or changes its signature.
"""

from __future__ import annotations

import csv
import dataclasses

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning's writer deletes an existing metrics.csv; a resumed run appends to it instead
        # (the CLI has already dropped the rows past the checkpoint's step).
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


def appending_experiment(logger: CSVLogger) -> ExperimentWriter:
    """The logger's writer, made on first use as an AppendingWriter (CSVLogger.experiment's job)."""
    if logger._experiment is None:
        logger._fs.makedirs(logger.root_dir, exist_ok=True)
        logger._experiment = AppendingWriter(log_dir=logger.log_dir)
    return logger._experiment


def saves_on_a_timer(callback: ModelCheckpoint) -> bool:
    return callback._train_time_interval is not None


def every_n_train_steps(callback: ModelCheckpoint) -> int:
    return callback._every_n_train_steps


def last_saved_step(callback: ModelCheckpoint) -> int:
    return callback._last_global_step_saved


def save_step_checkpoint(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """What ModelCheckpoint.on_train_batch_end does once a step save is due."""
    if callback._should_skip_saving_checkpoint(trainer):
        return
    candidates = callback._monitor_candidates(trainer)
    if callback.monitor is not None and callback.monitor not in candidates:
        callback._defer_save_until_validation = True
        return
    callback._save_topk_checkpoint(trainer, candidates)
    callback._save_last_checkpoint(trainer, candidates)


def batches_done_in_restarted_epoch(trainer: L.Trainer | None) -> int:
    """Batches of the current epoch already trained when the fit loop restarts from a checkpoint (else 0)."""
    loop = trainer.fit_loop if trainer is not None else None
    if loop is None or not loop.restarting:
        return 0
    return loop.epoch_loop.batch_progress.current.completed


def plain_hyperparameters(module: L.LightningModule, convert) -> None:
    """Every dataclass among the saved hyperparameters as `convert(value)`, in both copies Lightning
    keeps: the live one (checkpoints) and the initial one (what loggers write to hparams.yaml)."""
    for saved in (module._hparams, module._hparams_initial):
        for key, value in saved.items():
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                saved[key] = convert(value)


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The module's trainer, or None (module.trainer raises when there is none)."""
    return module._trainer


class ExplicitValuesWin:
    """A LightningCLI mixin: the checkpoint's hyperparameters never override values given now
    (cli.CLI.parse_arguments merges them in the right order instead)."""

    def _parse_ckpt_path(self) -> None:
        pass
