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
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.trainer.states import TrainerFn

from .atomic_files import read_csv, replaced_atomically, write_csv


class AppendingWriter(ExperimentWriter):
    """Appends to a resumed run's metrics.csv, and rewrites it (a new column) or hparams.yaml through a
    temporary file and a rename: a kill at any moment leaves the old file or the new one, whole."""

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        write_csv(path, fieldnames, read_csv(path)[1])

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        with replaced_atomically(Path(self.log_dir, self.NAME_HPARAMS_FILE)) as tmp:
            save_hparams_to_yaml(tmp, self.hparams)

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


def train_time_due(callback: ModelCheckpoint, trainer: L.Trainer) -> bool:
    """Whether `train_time_interval` has passed since training started or the last timed save, by
    rank 0's clock (broadcast, as Lightning decides it, so that every rank saves at the same batch).
    Lightning's own check is skipped under manual optimization: this module's."""
    interval, last, now = callback._train_time_interval, callback._last_time_checked, time.monotonic()
    due = trainer.strategy.broadcast(last is not None and now - last >= interval.total_seconds())
    if due:
        callback._last_time_checked = now
    return due


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


def validates_after_this_batch(trainer: L.Trainer) -> bool:
    """Whether the training loop runs validation right after the current batch (its own decision)."""
    loop = trainer.fit_loop
    return loop.epoch_loop._should_check_val_fx(loop._data_fetcher)


def defer_save_to_validation_end(callback: ModelCheckpoint) -> None:
    """ModelCheckpoint.on_validation_end then takes the step save that was due."""
    callback._defer_save_until_validation = True


def take_deferred_save(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """The deferred step save, where on_validation_end did not take it (no validation ran)."""
    if callback._defer_save_until_validation:
        callback._defer_save_until_validation = False
        save_step_checkpoint(callback, trainer)


def epochs_finished(checkpoint: dict[str, Any]) -> int:
    """The epochs a checkpoint's fit loop has finished: the count FitLoop.done compares with max_epochs
    (`processed`, since an epoch-end checkpoint is saved before `completed` counts its epoch)."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):  # not written by a Trainer's fit
        return 0


def save_last_now(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


class HeldSigterm:
    """From its creation until `release()`, a SIGTERM (or a first Ctrl-C, which passes one on) is
    noted and not acted on, so that the evaluation loop does not stop in the middle of a validation;
    `release()` hands a noted one to Lightning's handler, and the training loop stops at the end of
    the batch (and saves on the way out).

    Lightning's evaluation loop reads the flag its handler sets after every batch: clearing the flag
    from a callback leaves a moment between the hook and that check, so the handler is swapped
    instead, for as long as the validation runs.
    """

    def __init__(self, trainer: L.Trainer):
        self.connector = trainer._signal_connector
        self.received_before, self.connector.received_sigterm = self.connector.received_sigterm, False
        self.received_now = False
        self.swapped = threading.current_thread() is threading.main_thread()  # only there can handlers change
        if self.swapped:
            self.lightning_handler = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame) -> None:
        self.received_now = True

    def release(self) -> None:
        if self.swapped:
            handler = self.lightning_handler
            signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)
            if self.received_now and callable(handler):
                handler(signal.SIGTERM, None)
        if self.received_before or self.received_now:
            self.connector.received_sigterm = True


def start_next_epoch_afresh(checkpoint: dict[str, Any]) -> None:
    """A checkpoint taken once an epoch is complete (SIGTERM at an epoch's last batch, the end of
    training) still counts that epoch's batches as the current epoch's, so a resume would take the
    next epoch as done too: set the current epoch's batch count to zero, as Lightning's next epoch does."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop:
        return
    epochs, batches = loop["epoch_progress"]["current"], loop["epoch_loop.batch_progress"]
    if epochs["ready"] == epochs["completed"] and batches["current"]["completed"] > 0:
        batches["current"] = dict.fromkeys(batches["current"], 0)
        batches["is_last_batch"] = False


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


def fitting(module: L.LightningModule) -> bool:
    """Whether the module is being fitted: False in test, validate and predict; True outside a
    trainer too, so that load_from_checkpoint keeps the checkpoint's state as a resume would."""
    trainer = attached_trainer(module)
    return trainer is None or trainer.state.fn == TrainerFn.FITTING


class ExplicitValuesWin:
    """A LightningCLI mixin: the checkpoint's hyperparameters never override values given now
    (cli.CLI.parse_arguments merges them in the right order instead)."""

    def _parse_ckpt_path(self) -> None:
        pass
