"""What a run prints besides the tables: Lightning's progress bar and model summary, less their noise."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from rich import get_console
from rich.table import Table


class RunProgressBar(RichProgressBar):
    """Lightning's rich bar without `v_num`: the run folder's version is printed at the end, and a
    float column showed it as `0.000`."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class RunModelSummary(ModelSummary):
    """Lightning's summary table without FLOPs, which it counts only with an `example_input_array`
    (a language model has none) and so showed as 0 for every layer and in total."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style="bold magenta")
        for name, _ in columns:
            table.add_column(name, justify="right" if name == "Params" else "left")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        console.print(
            f"[bold]Trainable params[/]: {get_human_readable_count(trainable_parameters)}   "
            f"[bold]Total params[/]: {get_human_readable_count(total_parameters)}   "
            f"[bold]Size[/]: {get_formatted_model_size(model_size)} MB   "
            f"[bold]Modules in train / eval mode[/]: {total_training_modes['train']} / {total_training_modes['eval']}"
        )
