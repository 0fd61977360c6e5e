"""Run folders that survive interruption: one history per run, resumed in place.

`train.py fit --ckpt_path last` (or a checkpoint's path) continues the run the checkpoint belongs
to: the same `logs/<name>/version_N/`, its `metrics.csv` cut back to the checkpoint's step and
appended to, its `config.yaml` kept and the resume's configuration written beside it. The model
settings come from the checkpoint unless given now (config files or command line), and a change
that alters the objective is reported and recorded in the run's objective_changes.yaml. train.py
wires these helpers into LightningCLI.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..training.atomic_files import read_csv, replaced_atomically, write_csv
from ..training.checkpoint_state import check_grouped
from ..training.lightning_internals import (
    HeldSigterm,
    appending_experiment,
    defer_save_to_validation_end,
    epochs_finished,
    every_n_train_steps,
    last_saved_step,
    save_last_now,
    save_step_checkpoint,
    saves_on_a_timer,
    take_deferred_save,
    train_time_due,
    validates_after_this_batch,
)
from ..training.log import row_held_by_checkpoint

# Settings whose change between the checkpoint and the resumed run changes what is optimised
# (a group's name covers all its fields).
OBJECTIVE_SETTINGS = (
    "policy",
    "reference",
    "objective",
    "sampling.samples_per_prompt",
    "updates.ppo_epochs",
    "updates.minibatches",
    "lora",
)
CHECKPOINTS_DIR = "checkpoints"
# In a run folder: the step from which each changed objective setting applied (compare_runs reads it).
OBJECTIVE_CHANGES = "objective_changes.yaml"
OBJECTIVE_CHANGES_HEADER = (
    "# Settings that change the objective, changed when this run was resumed: from_step is the first\n"
    "# step (metrics.csv's step column) trained with the value after; the steps before it had the one before.\n"
)


class RunLogger(CSVLogger):
    """CSVLogger whose run folder a resumed run appends to; rows reach the file every step by default."""

    def __init__(
        self,
        save_dir: str = "logs",
        name: str = "default",
        version: int | str | None = None,
        flush_logs_every_n_steps: int = 1,
    ):
        """
        Args:
            save_dir: root folder of the runs.
            name: experiment name: runs go to <save_dir>/<name>/version_N.
            version: N; None picks the next free one (a resume sets the resumed run's).
            flush_logs_every_n_steps: write buffered rows to metrics.csv this often.
        """
        super().__init__(save_dir, name=name, version=version, flush_logs_every_n_steps=flush_logs_every_n_steps)

        # False while `test` evaluates a checkpoint in its own run folder: hparams.yaml stays the
        # training's record, which compare-runs reads (the test's settings are in its config file).
        self.record_hparams = True

    @property
    def experiment(self) -> ExperimentWriter:
        return appending_experiment(self)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        if self.record_hparams:
            super().log_hyperparams(params, *args, **kwargs)


class LastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint for last.ckpt: saved at the same point of a batch whatever triggers it, so that
    every last.ckpt resumes to the uninterrupted run's history.

    That point is the end of a batch and of the validation that follows it, if any: a step save due
    at an epoch's last batch waits for the epoch's validation (a resume would otherwise skip it), a
    SIGTERM or Ctrl-C received during validation waits for its end, and an error or a second Ctrl-C
    in the middle of a batch saves nothing (the previous last.ckpt stays, which resumes exactly).
    The module steps its optimizer itself, possibly several times per batch: a save is due when a
    batch's steps reach a multiple of every_n_train_steps (not only when they land on it), and a timed
    save (train_time_interval) at the first batch end after the interval, which Lightning's own
    ModelCheckpoint never takes under manual optimization.
    """

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        if pl_module.automatic_optimization:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if saves_on_a_timer(self):
            due = train_time_due(self, trainer)
        else:
            every, start = every_n_train_steps(self), getattr(self, "_step_at_batch_start", trainer.global_step)
            due = every >= 1 and trainer.global_step // every > start // every
        if due:
            if validates_after_this_batch(trainer):
                defer_save_to_validation_end(self)
            else:
                save_step_checkpoint(self, trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # `validate` alone has no batch end to stop at, and the sanity check stops at once anyway.
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        self._held_sigterm = HeldSigterm(trainer) if fitting else None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        held, self._held_sigterm = getattr(self, "_held_sigterm", None), None
        if held is not None:
            held.release()  # a SIGTERM received meanwhile stops the training loop after this batch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        take_deferred_save(self, trainer)  # if no validation ran after all

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException at the end of a batch; anything else may have struck in
        # the middle of one, with some of its optimizer steps taken.
        # Only fit has a run to continue (a stopped `test` or `validate` has nothing to resume).
        self._held_sigterm = None  # Lightning's teardown puts its own handlers back
        wanted = self.save_on_exception and self.save_last and self.dirpath is not None
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING and wanted:
            save_last_now(self, trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # A save at this very step already holds it, taken mid-epoch: keep that one, which a
        # resume continues exactly (by now Lightning counts the cut-short epoch as finished).
        saved_now = last_saved_step(self) == trainer.global_step
        if self.save_last and self.dirpath is not None and not trainer.fast_dev_run and not saved_now:
            # Every rank calls it: saving is a collective under sharded strategies.
            path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(path, weights_only=self.save_weights_only)


def find_last_checkpoint(save_dir: str | Path, name: str) -> Path | None:
    """The newest run's `checkpoints/last.ckpt` under <save_dir>/<name>/version_*, if any."""
    candidates = []
    for path in Path(save_dir, name).glob(f"version_*/{CHECKPOINTS_DIR}/last.ckpt"):
        match = re.fullmatch(r"version_(\d+)", path.parent.parent.name)
        if match:
            candidates.append((int(match.group(1)), path))
    return max(candidates)[1] if candidates else None


def run_version(checkpoint: Path) -> int | None:
    """N when the checkpoint lies in a run folder `.../version_N/checkpoints/`, else None."""
    match = re.fullmatch(r"version_(\d+)", checkpoint.resolve().parent.parent.name)
    return int(match.group(1)) if match and checkpoint.resolve().parent.name == CHECKPOINTS_DIR else None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The parts of a checkpoint that the CLI needs: step and hyperparameters.

    Memory-mapped: the weights and optimizer state are not read, only the small entries used here
    (Lightning loads the checkpoint for real afterwards).
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return {
        "global_step": int(checkpoint.get("global_step", 0)),
        "epochs_finished": epochs_finished(checkpoint),
        "hparams": dict(checkpoint.get("hyper_parameters", {})),
    }


class UnreadableCheckpoint(ValueError):
    pass


def readable_checkpoint(path: Path, fall_back: bool) -> tuple[Path, dict[str, Any]]:
    """The checkpoint and its entries; if it cannot be read (a truncated or corrupt file), the newest
    readable checkpoint beside it when `fall_back` (with a warning), else UnreadableCheckpoint naming it."""
    try:
        return path, read_checkpoint(path)
    except Exception as error:  # torch.load raises whatever the damage makes the unpickler meet
        problem = f"{path} cannot be read, truncated or corrupt ({type(error).__name__})"
        older = newest_readable(path.parent, but=path)
        if older is None:
            raise UnreadableCheckpoint(f"{problem}, and no other checkpoint lies beside it") from None
        step = older[1]["global_step"]
        if not fall_back:
            raise UnreadableCheckpoint(
                f"{problem}: resume from the older checkpoint beside it, --ckpt_path {older[0]} (step {step})"
            ) from None
        warnings.warn(f"{problem}: resuming from the older {older[0]} (step {step}) instead", UserWarning, stacklevel=2)
        return older


def newest_readable(folder: Path, but: Path) -> tuple[Path, dict[str, Any]] | None:
    found = []
    for candidate in folder.glob("*.ckpt"):
        if candidate.resolve() == but.resolve():
            continue
        try:
            found.append((candidate, read_checkpoint(candidate)))
        except Exception:  # damaged as well
            continue
    return max(found, key=lambda f: (f[1]["global_step"], f[0].stat().st_mtime), default=None)


def resume_config_name(run_dir: Path, step: int, what: str = "resumed") -> str:
    """config.resumed-at-step-S.yaml, or .2.yaml, .3.yaml ... when the same checkpoint was resumed before
    (config.test-at-step-S.yaml for a test of the checkpoint)."""
    name, n = f"config.{what}-at-step-{step}.yaml", 2
    while (run_dir / name).exists():
        name, n = f"config.{what}-at-step-{step}.{n}.yaml", n + 1
    return name


def nothing_left_to_train(
    checkpoint: Path, saved: Mapping[str, Any], max_epochs: int | None, max_steps: int | None
) -> str | None:
    """'nothing left to train: ... raise --trainer.max_epochs to train on' when the checkpoint already
    reached the limits of this fit, by FitLoop.done's rule (-1: no limit; max_epochs None: 1000
    without max_steps, else none), so that `fit` would return at once."""
    step, epochs = saved["global_step"], saved["epochs_finished"]
    max_steps = -1 if max_steps is None else max_steps
    if max_steps != -1 and step >= max_steps:
        return (
            f"nothing left to train: {checkpoint} finished step {step} of max_steps={max_steps}; "
            "raise --trainer.max_steps to train on"
        )
    if max_epochs is None:
        max_epochs = 1000 if max_steps == -1 else -1
    if max_epochs != -1 and epochs >= max_epochs:
        return (
            f"nothing left to train: {checkpoint} finished epoch {epochs} of max_epochs={max_epochs}; "
            "raise --trainer.max_epochs to train on"
        )
    return None


def newest_config(run_dir: Path) -> Path:
    """The configuration the run last trained with: its latest resume's (by step, then by repeat), else config.yaml."""
    resumed = []
    for path in run_dir.glob("config.resumed-at-step-*.yaml"):
        match = re.fullmatch(r"config\.resumed-at-step-(\d+)(?:\.(\d+))?\.yaml", path.name)
        if match:  # a name of another making is not one of ours
            resumed.append((int(match.group(1)), int(match.group(2) or 1), path))
    return max(resumed)[2] if resumed else run_dir / "config.yaml"


def continue_command(argv: list[str], checkpoint: Path) -> str:
    """The command line that was run, resuming from `checkpoint`."""
    args, skip_next = [], False
    for arg in argv:
        if skip_next or arg.startswith("--ckpt_path="):
            skip_next = False
            continue
        if arg == "--ckpt_path":
            skip_next = True
            continue
        args.append(arg)
    return shlex.join(["python", sys.argv[0], *args, "--ckpt_path", str(checkpoint)])


def stop_report(cause: str, checkpoint: Path | None, argv: list[str] | None, saved_now: bool) -> str:
    """What an interrupted run prints last: the checkpoint that holds it and the command that continues it."""
    if checkpoint is None or not checkpoint.is_file():
        return f"stopped by {cause} before any checkpoint was saved: nothing to continue from, start the run again"
    try:
        step = read_checkpoint(checkpoint)["global_step"]
    except Exception:  # the report must not hide how the run stopped
        step = "unreadable"
    if saved_now:
        saved = f"stopped by {cause}, saved {checkpoint} (step {step})"
    else:
        saved = f"stopped at once by {cause}, nothing saved; the last checkpoint is {checkpoint} (step {step})"
    command = continue_command(argv, checkpoint) if argv is not None else f"--ckpt_path {checkpoint}"
    return f"{saved}; continue with: {command}"


def model_config(hparams: Mapping[str, Any]) -> dict[str, Any] | None:
    """{class_path, init_args} of the module that wrote the checkpoint, from its hyperparameters."""
    check_grouped(hparams)
    hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
    class_path = hparams.pop("_class_path", None)
    if class_path is None:
        return None
    return {"class_path": class_path, "init_args": hparams}


def dotted(options: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'objective': {'beta': 0.05}} -> {'objective.beta': 0.05}; a group set to None stays one key."""
    flat = {}
    for key, value in options.items():
        if hasattr(value, "items"):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def objective_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{'objective.beta': (0.05, 0.5)} for every objective setting that differs between checkpoint and now."""
    saved, now = dotted(saved), dotted(now)
    changes = {}
    for key in sorted(saved.keys() | now.keys()):
        if any(key == s or key.startswith(f"{s}.") for s in OBJECTIVE_SETTINGS) and saved.get(key) != now.get(key):
            changes[key] = (saved.get(key), now.get(key))
    return changes


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """'objective.beta: 0.05 -> 0.5; lora.r: 8 -> 16'."""
    return "; ".join(f"{key}: {before!r} -> {after!r}" for key, (before, after) in changes.items())


def record_objective_changes(run_dir: Path, step: int, changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Note in the run folder's objective_changes.yaml that from step `step` on the run trained with
    `changes`; the entries of an earlier resume past `step` go, as its metrics rows do (their steps
    are trained again). Without any change left, the file goes too."""
    path = run_dir / OBJECTIVE_CHANGES
    entries = read_objective_changes(run_dir)
    entries = [e for e in entries if e["from_step"] < step]
    if changes:
        # As plain YAML: a tuple or an object of the config is written as JSON would write it.
        plain = json.loads(json.dumps({k: list(v) for k, v in changes.items()}, default=str))
        settings = {key: {"before": before, "after": after} for key, (before, after) in plain.items()}
        entries.append({"from_step": step, "changes": settings})
    if entries:
        with replaced_atomically(path) as tmp:
            tmp.write_text(OBJECTIVE_CHANGES_HEADER + yaml.safe_dump(entries, sort_keys=False))
    elif path.is_file():
        path.unlink()


def read_objective_changes(run_dir: Path) -> list[dict[str, Any]]:
    """The entries of a run folder's objective_changes.yaml, by step ([] without the file)."""
    path = run_dir / OBJECTIVE_CHANGES
    if not path.is_file():
        return []
    try:
        entries = yaml.safe_load(path.read_text()) or []
        return sorted(entries, key=lambda e: int(e["from_step"]))
    except (yaml.YAMLError, TypeError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from error


def drop_rows_after(metrics_csv: Path, step: int) -> int:
    """Remove the rows of the steps after a checkpoint taken at global step `step`; returns how many.

    Which rows a checkpoint holds is the `step` column's rule (training/log.py). A run killed after
    its last checkpoint leaves later rows, which the resumed run writes again.
    """
    if not metrics_csv.is_file():
        return 0
    fields, rows = read_csv(metrics_csv)
    kept = [r for r in rows if row_held_by_checkpoint(r, step)]
    if len(kept) < len(rows):
        write_csv(metrics_csv, fields, kept)  # a kill now leaves the old file whole, not a cut one
    return len(rows) - len(kept)


def objective_changes_warning(changes: Mapping[str, tuple[Any, Any]], step: int, run_dir: Path | None) -> str:
    """The line a resumed fit ends with when it changed the objective, after everything Lightning printed."""
    where = f"; recorded in {run_dir / OBJECTIVE_CHANGES}, and compare-runs labels the run mixed" if run_dir else ""
    return (
        f"warning: resumed at step {step} with settings that change the objective ({describe_changes(changes)}): "
        f"the steps before it trained another objective{where}"
    )
