"""Callbacks that read what the module logged after each validation and draw or tabulate it.

They hold no training logic. Under DDP, reading `trainer.callback_metrics` and `trainer.log_dir`
can involve collectives, so every rank does that part and only rank 0 draws and writes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure

from . import plots
from .estimators import LOGGED_ESTIMATORS


def run_directory(trainer: L.Trainer) -> Path:
    """Where a run's files go. Call it on every rank: `trainer.log_dir` is a broadcast."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class ValidationHistory(L.Callback):
    """Keeps every validation epoch's `val/*` metrics (also across a resume, via the checkpoint)."""

    def __init__(self):
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics  # every rank: may sync
        snapshot = {k: float(v) for k, v in metrics.items() if k.startswith("val/")}
        if not snapshot:
            return
        snapshot["epoch"] = float(trainer.current_epoch)
        snapshot["step"] = float(trainer.global_step)
        self.history.append(snapshot)
        run_dir = run_directory(trainer)
        if trainer.is_global_zero:
            self.on_history(trainer, run_dir)

    def on_history(self, trainer: L.Trainer, run_dir: Path) -> None:
        """Called on rank 0 after each validation epoch with `self.history` up to date."""

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def save_figure(trainer: L.Trainer, fig: Figure, path: Path, tag: str) -> None:
    """Write the PNG, and hand the figure to TensorBoard or W&B when they are the loggers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(tag, fig, global_step=trainer.global_step, close=False)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[str(path)], step=trainer.global_step)


class EpochPlot(ValidationHistory):
    """Base of the per-epoch plots: one PNG per validation epoch, `<dirname>/<stem>_epochNNN.png`."""

    stem = "plot"
    default_estimators: tuple[str, ...] = LOGGED_ESTIMATORS

    def __init__(self, estimators: list[str] | None = None, dirname: str = "plots"):
        """
        Args:
            estimators: KL estimators to draw, any of mc, k2, k3, cv, cv_opt, rb.
            dirname: folder under the run directory for the PNGs.
        """
        super().__init__()
        self.estimators = list(estimators or self.default_estimators)
        unknown = set(self.estimators) - set(LOGGED_ESTIMATORS)
        if unknown:
            raise ValueError(f"unknown estimators {sorted(unknown)}; valid: {', '.join(LOGGED_ESTIMATORS)}")
        self.dirname = dirname

    def draw(self) -> Figure:
        raise NotImplementedError

    def on_history(self, trainer: L.Trainer, run_dir: Path) -> None:
        epoch = int(self.history[-1]["epoch"])
        save_figure(trainer, self.draw(), run_dir / self.dirname / f"{self.stem}_epoch{epoch:03d}.png", self.stem)


class RewardVsKLPlot(EpochPlot):
    """Reward against KL over the epochs so far (default: RB KL, with standard-error bars)."""

    stem = "reward_vs_kl"
    default_estimators = ("rb",)

    def draw(self) -> Figure:
        return plots.reward_vs_kl(self.history, self.estimators)


class EstimatorVariancePlot(EpochPlot):
    """Each KL estimator's per-prompt spread over the epochs so far (default: all estimators)."""

    stem = "estimator_spread"

    def draw(self) -> Figure:
        return plots.estimator_variance(self.history, self.estimators)


class EstimatorTable(ValidationHistory):
    """At the end of fit: the last validation's estimator study as a table (console, CSV and JSON).

    For each estimator: the mean over prompts of its per-prompt mean and standard deviation over
    the M samples of that prompt (the paper's Table 1 layout).
    """

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = run_directory(trainer)
        if not trainer.is_global_zero or not self.history:
            return
        last = self.history[-1]
        rows = [
            {
                "estimator": name,
                "mean": last.get(f"val/kl/{name}/prompt_mean", float("nan")),
                "std": last.get(f"val/kl/{name}/prompt_std", float("nan")),
                "neg_frac": last.get(f"val/kl/{name}/neg_frac", float("nan")),
            }
            for name in LOGGED_ESTIMATORS
        ]
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "estimator_table.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (run_dir / "estimator_table.json").write_text(json.dumps({"epoch": last["epoch"], "rows": rows}, indent=2))
        lines = [
            f"KL estimators at epoch {int(last['epoch'])} (per prompt, averaged over prompts):",
            f"  {'estimator':<9} {'mean':>10}   {'std':>10}   {'P(<0)':>6}",
        ]
        lines += [f"  {r['estimator']:<9} {r['mean']:>10.4f} ± {r['std']:<10.4f} {r['neg_frac']:>6.2f}" for r in rows]
        print("\n".join(lines))
