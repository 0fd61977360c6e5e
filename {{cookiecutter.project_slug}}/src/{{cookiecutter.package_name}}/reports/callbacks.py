"""Callbacks that read what the module logged after each epoch and draw or tabulate it.

They hold no training logic. Each plot is one file, `<run>/plots/<stem>.png`, redrawn from the
whole run after each epoch and replaced in one step; `keep_every_epoch` keeps a copy per epoch too.
Under DDP, reading `trainer.callback_metrics` and `trainer.log_dir` can involve collectives, so
every rank does that part and only rank 0 draws and writes.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure

from ..kl.estimators import LOGGED_ESTIMATORS
from ..training.atomic_files import read_csv, replaced_atomically
from ..training.metrics import KL_STATS, grad_var_key, kl_key, ratio_key
from . import plots
from .kl_report import build_report, report_markdown


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


def save_figure(trainer: L.Trainer, fig: Figure, path: Path, tag: str, keep_epoch: int | None = None) -> None:
    """Replace the PNG at `path` in one step (a kill leaves the previous figure or this one, never a
    part), and hand the figure to TensorBoard or W&B when they are the loggers. With `keep_epoch`,
    a copy stays beside it as `<stem>_epochNNN.png`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format="png")
    if keep_epoch is not None:
        with replaced_atomically(path.with_name(f"{path.stem}_epoch{keep_epoch:03d}{path.suffix}")) as tmp:
            shutil.copyfile(path, tmp)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(tag, fig, global_step=trainer.global_step, close=False)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[str(path)], step=trainer.global_step)


class PlotFile:
    """What the plot callbacks share: the figure goes to `<run>/<dirname>/<stem>.png`."""

    stem = "plot"
    dirname = "plots"
    keep_every_epoch = False

    def write(self, trainer: L.Trainer, run_dir: Path, fig: Figure, epoch: int) -> None:
        path = run_dir / self.dirname / f"{self.stem}.png"
        save_figure(trainer, fig, path, self.stem, keep_epoch=epoch if self.keep_every_epoch else None)


class EpochPlot(ValidationHistory, PlotFile):
    """Base of the validation plots: `<dirname>/<stem>.png`, redrawn over every epoch so far after each
    validation; with `keep_every_epoch`, also `<dirname>/<stem>_epochNNN.png`, the figure as it was then."""

    default_estimators: tuple[str, ...] = LOGGED_ESTIMATORS

    def __init__(self, estimators: list[str] | None = None, dirname: str = "plots", keep_every_epoch: bool = False):
        """
        Args:
            estimators: KL estimators to draw, any of mc, k2, k3, cv, cv_opt, rb.
            dirname: folder under the run directory for the PNGs.
            keep_every_epoch: also keep each epoch's figure as `<stem>_epochNNN.png`.
        """
        super().__init__()
        self.estimators = list(estimators or self.default_estimators)
        unknown = set(self.estimators) - set(LOGGED_ESTIMATORS)
        if unknown:
            raise ValueError(f"unknown estimators {sorted(unknown)}; valid: {', '.join(LOGGED_ESTIMATORS)}")
        self.dirname, self.keep_every_epoch = dirname, keep_every_epoch

    def draw(self) -> Figure:
        raise NotImplementedError

    def on_history(self, trainer: L.Trainer, run_dir: Path) -> None:
        self.write(trainer, run_dir, self.draw(), int(self.history[-1]["epoch"]))


def reward_name(reward: Any) -> str:
    """What a module's reward is called on a plot: its `name` if it has one, else its class's
    (a function's own name for a plain function); "no reward" for None."""
    if reward is None:
        return "no reward"
    name = getattr(reward, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(reward, "__name__", None) or type(reward).__name__


class RewardVsKLPlot(EpochPlot):
    """Reward against KL over the epochs so far (default: RB KL, with standard-error bars)."""

    stem = "reward_vs_kl"
    default_estimators = ("rb",)
    reward_label = ""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Only read: the y axis names the reward the module was given.
        self.reward_label = reward_name(getattr(pl_module, "reward", None))

    def draw(self) -> Figure:
        return plots.reward_vs_kl(self.history, self.estimators, reward_name=self.reward_label)


class EstimatorVariancePlot(EpochPlot):
    """Each KL estimator's spread over samples of one prompt, per epoch (default: all estimators)."""

    stem = "estimator_spread"

    def draw(self) -> Figure:
        return plots.estimator_spread(self.history, self.estimators)


class GradVariancePlot(ValidationHistory, PlotFile):
    """The gradient variances of updates.track_grad_variance per epoch, once they are logged:
    `<dirname>/grad_variance.png`, redrawn after each validation (see `EpochPlot`)."""

    stem = "grad_variance"

    def __init__(self, dirname: str = "plots", keep_every_epoch: bool = False):
        """
        Args:
            dirname: folder under the run directory for the PNGs.
            keep_every_epoch: also keep each epoch's figure as `grad_variance_epochNNN.png`.
        """
        super().__init__()
        self.dirname, self.keep_every_epoch = dirname, keep_every_epoch

    def on_history(self, trainer: L.Trainer, run_dir: Path) -> None:
        if grad_var_key("val", "spread", "total_rb") not in self.history[-1]:
            return  # the option is off: nothing to draw
        self.write(trainer, run_dir, plots.gradient_variance(self.history), int(self.history[-1]["epoch"]))


def logged_rows(logger: CSVLogger) -> list[dict[str, float]]:
    """Every row of the logger's metrics.csv as numbers, an empty cell as NaN (rank 0 only)."""
    logger.save()  # rows still buffered go to the file first, as Lightning does after each self.log
    path = Path(logger.log_dir) / "metrics.csv"
    rows = read_csv(path)[1] if path.is_file() else []
    return [{key: float(value) if value else math.nan for key, value in row.items()} for row in rows]


class TrainingCurvesPlot(L.Callback, PlotFile):
    """Per-step training curves in `<dirname>/training_curves.png`, redrawn after each training epoch.

    Read back from the run's metrics.csv (the whole run, also across a resume): the reward (the
    total, and each reward function's mean where logged), the RB KL, the loss and the response
    length, with each validation's means on the reward and KL panels. Without a CSVLogger among
    the loggers it draws nothing: TensorBoard and W&B draw their own curves.
    """

    stem = "training_curves"
    reward_label = ""

    def __init__(self, dirname: str = "plots", keep_every_epoch: bool = False):
        """
        Args:
            dirname: folder under the run directory for the PNG.
            keep_every_epoch: also keep each epoch's figure as `training_curves_epochNNN.png`.
        """
        self.dirname, self.keep_every_epoch = dirname, keep_every_epoch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.reward_label = reward_name(getattr(pl_module, "reward", None))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the epoch's validation, whose rows are in metrics.csv by now.
        run_dir = run_directory(trainer)  # every rank: may sync
        csv_logger = next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)
        if not trainer.is_global_zero or csv_logger is None:
            return
        rows = logged_rows(csv_logger)
        if rows:
            self.write(trainer, run_dir, plots.training_curves(rows, self.reward_label), trainer.current_epoch)


def table_rows(metrics: Mapping[str, float], stage: str) -> list[dict[str, float | str]]:
    """One row per estimator: the statistics of metrics.py, as logged."""
    return [
        {"estimator": name, **{stat: float(metrics.get(kl_key(stage, name, stat), float("nan"))) for stat in KL_STATS}}
        for name in LOGGED_ESTIMATORS
    ]


class EstimatorTable(ValidationHistory):
    """At the end of fit: the last validation's estimator study as a table (console, CSV and JSON).

    For each estimator: its KL estimate with the standard error over prompts, and its variance
    over samples of one prompt, averaged over prompts (the paper's Table 1 quantity).
    """

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = run_directory(trainer)
        if not trainer.is_global_zero or not self.history:
            return
        last = self.history[-1]
        rows = table_rows(last, "val")
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "estimator_table.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        ratio = last.get(ratio_key("val"), float("nan"))
        summary = {"epoch": last["epoch"], "rows": rows, "within_prompt_var_ratio_mc_over_rb": ratio}
        (run_dir / "estimator_table.json").write_text(json.dumps(summary, indent=2))
        lines = [
            f"KL estimators at epoch {int(last['epoch'])} ({plots.sizes_text(last)}):",
            f"  {'estimator':<9} {'KL':>9} {'± s.e.':>9} {'var within prompt':>18} {'P(<0)':>6}",
        ]
        lines += [
            f"  {r['estimator']:<9} {r['mean']:>9.4f} {r['sem_prompts']:>9.4f} {r['within_prompt_var']:>18.4g} "
            f"{r['neg_frac']:>6.2f}"
            for r in rows
        ]
        lines.append(f"  within-prompt variance MC / RB: {ratio:.3g}")
        print("\n".join(lines))


class SampleTable(L.Callback):
    """At each validation, a few sampled completions per prompt with their reward and RB/MC KL.

    Written to `<dirname>/epochNNN.csv` in the run directory (and as text to TensorBoard or W&B),
    to spot reward hacking by reading. Rank 0's prompts only.
    """

    def __init__(self, per_prompt: int = 2, max_prompts: int = 8, dirname: str = "samples"):
        """
        Args:
            per_prompt: completions kept per prompt.
            max_prompts: prompts kept per validation.
            dirname: folder under the run directory for the CSV files.
        """
        if per_prompt < 1 or max_prompts < 1:
            raise ValueError(f"per_prompt and max_prompts must be >= 1, got {per_prompt} and {max_prompts}")
        self.per_prompt, self.max_prompts, self.dirname = per_prompt, max_prompts, dirname
        self.rows: list[dict[str, Any]] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not outputs or trainer.sanity_checking:
            return
        group = len(outputs["responses"]) // len(outputs["prompts"])
        for i, prompt in enumerate(outputs["prompts"]):
            if len({r["prompt"] for r in self.rows}) >= self.max_prompts:
                return
            for j in range(i * group, i * group + min(self.per_prompt, group)):
                self.rows.append(
                    {
                        "prompt": prompt,
                        "response": outputs["responses"][j],
                        "reward": float(outputs["rewards"][j]),
                        "kl_rb": float(outputs["kl/rb"][j]),
                        "kl_mc": float(outputs["kl/mc"][j]),
                    }
                )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        run_dir = run_directory(trainer)  # every rank: may sync
        if not trainer.is_global_zero or not self.rows:
            return
        path = run_dir / self.dirname / f"epoch{trainer.current_epoch:03d}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        text = "\n".join(
            f"| {r['prompt']} | {r['response']} | {r['reward']:.3f} | {r['kl_rb']:.3f} | {r['kl_mc']:.3f} |"
            for r in self.rows
        )
        text = "| prompt | response | reward | KL rb | KL mc |\n|---|---|---|---|---|\n" + text
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", text, global_step=trainer.global_step)
            elif isinstance(logger, WandbLogger):
                logger.log_text(key="samples", columns=list(self.rows[0]), data=[list(r.values()) for r in self.rows])


class KLReport(L.Callback):
    """After `train.py test`: `kl_report.json`, `kl_report.md` and `kl_precision.png` in the run directory."""

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}  # may sync
        run_dir = run_directory(trainer)
        if not trainer.is_global_zero or not metrics:
            return
        h = pl_module.hparams
        policy = h.policy + (" + LoRA adapter" if h.get("lora") else "")
        if trainer.ckpt_path:  # the weights tested are the checkpoint's, trained from the configured policy
            policy = f"{trainer.ckpt_path} (trained from {policy})"
        report = build_report(
            metrics,
            LOGGED_ESTIMATORS,
            policy=policy,
            # With LoRA and no reference named, the reference is the policy's base (adapter off).
            reference=h.reference or h.policy,
            max_new_tokens=pl_module.sampling.max_new_tokens,
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "kl_report.json").write_text(json.dumps(report, indent=2))
        markdown = report_markdown(report)
        (run_dir / "kl_report.md").write_text(markdown)
        save_figure(trainer, plots.precision_vs_samples(report), run_dir / "kl_precision.png", "kl_precision")
        print(markdown + f"\nwrote {run_dir / 'kl_report.json'}, kl_report.md and kl_precision.png")
