"""A 2-epoch offline run: the logged names tools rely on, the PNGs (one file per plot, replaced
after each epoch), the estimator table; the plots drawn from synthetic histories of 1 to 30
epochs and the training curves from synthetic logs; the KL report's note on few prompts."""

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
from conftest import drawn_clashes, make_trainer
from matplotlib.image import imread

from {{ cookiecutter.package_name }}.kl.estimators import LOGGED_ESTIMATORS, VALUE_ESTIMATORS
from {{ cookiecutter.package_name }}.reports import plots
from {{ cookiecutter.package_name }}.reports.callbacks import (
    EstimatorTable,
    EstimatorVariancePlot,
    RewardVsKLPlot,
    SampleTable,
    TrainingCurvesPlot,
    save_figure,
)
from {{ cookiecutter.package_name }}.reports.kl_report import MIN_PROMPTS_FOR_POPULATION, build_report, report_markdown
from {{ cookiecutter.package_name }}.training.data import PromptDataModule
from {{ cookiecutter.package_name }}.training.metrics import KL_STATS, kl_key, reward_key, size_key
from {{ cookiecutter.package_name }}.training.module import RBKLModule
from {{ cookiecutter.package_name }}.training.options import Optimization, Sampling
from {{ cookiecutter.package_name }}.training.rewards import KeywordReward, VaderSentimentReward


class PlotWatch(L.Callback):
    """What plots/ holds at the end of each training epoch, after the plot callbacks listed before
    this one: each file's inode, modification time and bytes."""

    def __init__(self):
        self.epochs: list[dict[str, tuple[int, int, bytes]]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        files = sorted((Path(trainer.log_dir) / "plots").iterdir())
        self.epochs.append({p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in files})


@pytest.fixture(scope="module")
def plot_watch() -> PlotWatch:
    return PlotWatch()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, plot_watch) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    L.seed_everything(0)
    figures = [
        RewardVsKLPlot(estimators=["rb", "mc"], keep_every_epoch=True),
        EstimatorVariancePlot(),
        TrainingCurvesPlot(),
    ]
    trainer = make_trainer(
        tmp,
        max_epochs=2,
        callbacks=[*figures, EstimatorTable(), SampleTable(), plot_watch],
        enable_checkpointing=False,
    )
    module = RBKLModule(
        reward=VaderSentimentReward(), optimization=Optimization(lr=1e-3), sampling=Sampling(val_samples_per_prompt=4)
    )
    trainer.fit(module, PromptDataModule(batch_size=8, epoch_repeats=2))
    return Path(trainer.log_dir)


def test_metrics_csv_has_every_documented_name(run_dir):
    header = next(csv.reader(open(run_dir / "metrics.csv")))
    expected = set()
    for stage in ("train", "val"):
        for name in LOGGED_ESTIMATORS:
            expected |= {f"{stage}/kl/{name}/{stat}" for stat in KL_STATS}
        expected |= {f"{stage}/reward/mean", f"{stage}/reward/sem_prompts", f"{stage}/prompts"}
        expected |= {f"{stage}/samples_per_prompt", f"{stage}/kl/within_prompt_var_ratio/mc_over_rb"}
    assert expected <= set(header), sorted(expected - set(header))
    assert not [h for h in header if h.endswith(("/var", "/sem", "/std", "prompt_std", "prompt_mean"))]


PLOTS = ["estimator_spread.png", "reward_vs_kl.png", "training_curves.png"]


def test_one_png_per_plot_that_decodes_at_the_expected_size(run_dir):
    for stem in ("reward_vs_kl", "estimator_spread"):
        pngs = sorted((run_dir / "plots").glob(f"{stem}*.png"))
        kept = [f"{stem}_epoch000.png", f"{stem}_epoch001.png"] if stem == "reward_vs_kl" else []
        assert [p.name for p in pngs] == [f"{stem}.png", *kept]
        for png in pngs:
            assert imread(png).shape == (480, 640, 4)
    assert imread(run_dir / "plots" / "training_curves.png").shape == (768, 1280, 4)


def test_each_plot_is_replaced_after_each_epoch_and_kept_per_epoch_only_when_asked(run_dir, plot_watch):
    first, second = plot_watch.epochs
    # RewardVsKLPlot alone has keep_every_epoch; no temporary file is ever left beside the plots.
    assert sorted(first) == sorted([*PLOTS, "reward_vs_kl_epoch000.png"])
    assert sorted(second) == sorted([*PLOTS, "reward_vs_kl_epoch000.png", "reward_vs_kl_epoch001.png"])
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == sorted(second)
    for name in PLOTS:
        (inode, mtime, content), (inode_after, mtime_after, content_after) = first[name], second[name]
        assert content_after != content and mtime_after > mtime, f"{name} is redrawn with the second epoch"
        assert inode_after != inode, f"{name} is replaced by a rename, never rewritten where it lies"
    assert second["reward_vs_kl_epoch000.png"] == first["reward_vs_kl_epoch000.png"], "a kept copy stays as it was"
    assert second["reward_vs_kl_epoch001.png"][2] == second["reward_vs_kl.png"][2]
    assert first["reward_vs_kl_epoch000.png"][2] == first["reward_vs_kl.png"][2]


def test_a_figure_that_fails_to_save_leaves_the_previous_one_whole(tmp_path):
    path, trainer = tmp_path / "plots" / "reward_vs_kl.png", SimpleNamespace(loggers=[], global_step=0)
    fig = plots.reward_vs_kl(synthetic_history(3))
    save_figure(trainer, fig, path, "reward_vs_kl")
    before = path.read_bytes()

    def disk_full(target, **kwargs):
        Path(target).write_bytes(before[:100])
        raise OSError("No space left on device")

    fig.savefig = disk_full
    with pytest.raises(OSError, match="No space"):
        save_figure(trainer, fig, path, "reward_vs_kl", keep_epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["reward_vs_kl.png"], "no temporary file, no copy"


def test_estimator_table_is_written_with_every_estimator(run_dir):
    table = json.loads((run_dir / "estimator_table.json").read_text())
    assert table["epoch"] == 1
    rows = {r["estimator"]: r for r in table["rows"]}
    assert set(VALUE_ESTIMATORS) <= set(rows)
    assert rows["rb"]["within_prompt_var"] >= 0 and rows["rb"]["mean"] >= 0
    assert table["within_prompt_var_ratio_mc_over_rb"] > 0
    header = (run_dir / "estimator_table.csv").read_text().splitlines()[0]
    assert header == "estimator," + ",".join(KL_STATS)


def test_sample_tables_show_completions_with_reward_and_kl(run_dir):
    tables = sorted((run_dir / "samples").glob("epoch*.csv"))
    assert [p.name for p in tables] == ["epoch000.csv", "epoch001.csv"]
    rows = list(csv.DictReader(tables[-1].open()))
    assert rows and set(rows[0]) == {"prompt", "response", "reward", "kl_rb", "kl_mc"}
    assert len({r["prompt"] for r in rows}) > 1 and all(float(r["kl_rb"]) >= 0 for r in rows)


def test_unknown_estimator_in_plot_is_refused():
    with pytest.raises(ValueError, match="unknown estimators"):
        RewardVsKLPlot(estimators=["k9"])


def test_plots_reach_tensorboard_when_it_is_the_logger(tiny_trainer, tmp_path):
    pytest.importorskip("tensorboardX")
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(0)
    trainer = tiny_trainer(
        max_epochs=1,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[RewardVsKLPlot()],
        enable_checkpointing=False,
        limit_train_batches=2,
    )
    trainer.fit(
        RBKLModule(reward=VaderSentimentReward(), sampling=Sampling(val_samples_per_prompt=2)),
        PromptDataModule(batch_size=8),
    )
    events = b"".join(p.read_bytes() for p in tmp_path.rglob("events.out.tfevents.*"))
    assert b"reward_vs_kl" in events and b"\x89PNG" in events  # the figure, as a PNG image summary
    assert b"train/kl/rb/mean" in events
    assert list((Path(trainer.log_dir) / "plots").glob("reward_vs_kl.png"))


# Within-prompt SDs relative to RB's: mc, k2, k3, cv and cv_opt nearly equal, as in real runs.
SPREAD = {"rb": 1.0, "mc": 2.0, "k2": 1.9, "k3": 1.9, "cv": 2.3, "cv_opt": 2.3}


def synthetic_history(epochs: int) -> list[dict[str, float]]:
    """Validation metrics of a run drifting from its reference: epoch 0 has KL 0 and every spread
    0 (policy = reference), then KL grows and the reward saturates, with some jitter."""
    history = []
    for epoch in range(epochs):
        kl = 0.01 * epoch**1.3 * (1 + 0.1 * math.sin(3 * epoch))
        row = {"epoch": float(epoch), "step": 10.0 * epoch, size_key("val", "prompts"): 16.0}
        row[size_key("val", "samples_per_prompt")] = 8.0
        row[reward_key("val", "mean")] = 0.1 + 0.5 * (1 - math.exp(-epoch / 6)) + 0.01 * math.cos(5 * epoch)
        row[reward_key("val", "sem_prompts")] = 0.04
        for i, name in enumerate(LOGGED_ESTIMATORS):
            var = 0.5 * (SPREAD[name] * kl) ** 2
            row[kl_key("val", name, "mean")] = kl * (1 + 0.05 * math.sin(epoch + i))
            row[kl_key("val", name, "sem_prompts")] = 0.1 * kl + (0.002 if epoch else 0.0)
            row[kl_key("val", name, "within_prompt_var")] = var
            row[kl_key("val", name, "within_prompt_var_sem")] = 0.2 * var
        history.append(row)
    return history


@pytest.mark.parametrize("epochs", [1, 3, 10, 30])
def test_reward_vs_kl_labels_first_and_last_epoch_clear_of_markers_and_legend(epochs, tmp_path):
    fig = plots.reward_vs_kl(synthetic_history(epochs), ["rb", "mc"], reward_name="VaderSentimentReward")
    fig.savefig(tmp_path / f"reward_vs_kl_{epochs}.png")  # for a look: pytest --basetemp=DIR
    assert drawn_clashes(fig) == []
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert "epoch 0" in labels and (epochs == 1 or str(epochs - 1) in labels), labels
    assert len(labels) >= min(epochs, 4), "labels left out only where there is no room"
    assert fig.axes[0].get_ylabel() == "reward: VaderSentimentReward"


@pytest.mark.parametrize("reward, name", [(KeywordReward(["good"]), "KeywordReward"), (None, "no reward")])
def test_the_reward_vs_kl_callback_names_the_modules_reward(reward, name):
    def trl_style(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    for given, expected in ((reward, name), (trl_style, "trl_style")):
        callback = RewardVsKLPlot()
        callback.setup(None, SimpleNamespace(reward=given), "fit")
        callback.history = synthetic_history(3)
        assert callback.draw().axes[0].get_ylabel() == f"reward: {expected}"


@pytest.mark.parametrize("epochs", [1, 3, 30])
def test_estimator_spread_explains_each_name_and_keeps_a_readable_range(epochs, tmp_path):
    fig = plots.estimator_spread(synthetic_history(epochs), LOGGED_ESTIMATORS)
    fig.savefig(tmp_path / f"estimator_spread_{epochs}.png")
    assert drawn_clashes(fig) == []
    ax = fig.axes[0]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    for name in LOGGED_ESTIMATORS:
        entry = next(t for t in legend if t.startswith(f"{name}:"))
        assert len(entry) > len(name) + 10, f"{name} is explained, not just named: {entry!r}"
    assert "d = log" in fig.legends[0].get_title().get_text(), "d, used in the explanations, is defined"
    lo, hi = ax.get_xlim()
    assert lo < 0 and epochs - 1 < hi and hi - lo >= 1, "whole epochs, with room either side"
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(t == int(t) for t in ticks), ticks
    bottom, top = ax.get_ylim()
    assert bottom == 0 and top >= 1e-3, "a spread is >= 0; all-zero spreads keep a readable range"
    data_lines = [bars.lines[0] for bars in ax.containers]  # each errorbar's line through its points
    styles = [(line.get_marker(), str(line.get_linestyle())) for line in data_lines]
    assert len(styles) == len(LOGGED_ESTIMATORS) == len(set(styles)), styles
    # Equal spreads (all 0 at epoch 0) still show every marker: at least 3 pixels apart.
    first = sorted(ax.transData.transform(line.get_xydata()[0])[0] for line in data_lines)
    assert min(b - a for a, b in zip(first[:-1], first[1:], strict=True)) >= 3, first


@pytest.mark.parametrize("equal", [False, True])
def test_kl_precision_lines_stay_visible_where_they_coincide(equal, tmp_path):
    # k2 = k3 and cv = cv_opt exactly (with `equal`, every estimator the same): coinciding lines.
    var = dict.fromkeys(LOGGED_ESTIMATORS, 0.05) if equal else {"mc": 0.48, "rb": 0.0018}
    var = {"k2": 0.017, "k3": 0.017, "cv": 0.08, "cv_opt": 0.08, **var}
    report = {
        "prompts": 8,
        "samples_per_prompt": 16,
        "within_prompt_var_ratio_mc_over_rb": var["mc"] / var["rb"],
        "estimators": {name: {"within_prompt_var": var[name]} for name in LOGGED_ESTIMATORS},
    }
    fig = plots.precision_vs_samples(report)
    fig.savefig(tmp_path / f"kl_precision_{equal}.png")
    assert drawn_clashes(fig) == []
    ax = fig.axes[0]
    assert not ax.texts, "no annotation inside the axes, where it would cross the lines"
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert any(t.startswith("MC reaches it at M = ") for t in legend)
    lines = [line for line in ax.lines if line.get_label() in legend and line.get_markevery() is not None]
    assert len(lines) == len(LOGGED_ESTIMATORS), "one line per estimator, each in the legend"
    styles = {(line.get_marker(), line.get_linestyle()) for line in lines}
    assert len(styles) == len(lines), "every legend line has a marker and dashes of its own, colour aside"
    marked = []
    for line in lines:
        start, step = line.get_markevery()
        marked.append({round(x, 9) for x in line.get_xdata()[start::step]})
    for i, mine in enumerate(marked):
        others = set().union(*(m for j, m in enumerate(marked) if j != i))
        assert mine and not mine & others, "each line's markers at samples sizes of its own"


def kl_metrics(n: int, sem_prompts: dict[str, float], sem_within: float = 0.02) -> dict[str, float]:
    metrics = {size_key("test", "prompts"): float(n), size_key("test", "samples_per_prompt"): 16.0}
    for name in LOGGED_ESTIMATORS:
        stats = {"mean": 0.3, "sem_prompts": sem_prompts.get(name, 0.05), "sem_within": sem_within}
        stats |= {"within_prompt_var": 0.1, "neg_frac": 0.0}
        metrics |= {kl_key("test", name, stat): value for stat, value in stats.items()}
    return metrics


def markdown_of(metrics: dict[str, float]) -> str:
    return report_markdown(build_report(metrics, LOGGED_ESTIMATORS, policy="p", reference="q", max_new_tokens=8))


def test_the_kl_report_says_when_there_are_too_few_prompts_for_the_population_interval():
    few, enough = MIN_PROMPTS_FOR_POPULATION - 1, MIN_PROMPTS_FOR_POPULATION
    assert "Note:" not in markdown_of(kl_metrics(enough, {}))
    note = markdown_of(kl_metrics(few, {})).splitlines()[-1]
    assert note.startswith(f"Note: With {few} prompts (fewer than {enough})") and "do not trust" in note
    # MC's population interval a tenth as wide as its these-prompts one (as in the issue's
    # 4-prompt report); k3's 0.8 times as wide, which chance gives often: not flagged.
    note = markdown_of(kl_metrics(enough, {"mc": 0.002, "k3": 0.015})).splitlines()[-1]
    assert note.startswith("Note: For mc the population interval came out less than half as wide"), note
    assert "by chance" in note and "k3" not in note


def metrics_rows(functions: tuple[str, ...] = (), epochs: int = 3, steps_per_epoch: int = 4) -> list[dict[str, float]]:
    """Rows as metrics.csv holds them (every column in every row, NaN where not logged): training
    rows at each step, with each reward function's mean where `functions` are named, and one
    validation row per epoch at the step of the weights it evaluated."""
    rows = []
    for step in range(epochs * steps_per_epoch):
        epoch = step // steps_per_epoch
        row = {"epoch": epoch, "step": step, reward_key("train", "mean"): 0.1 * step + 0.05 * math.sin(step)}
        row |= {kl_key("train", "rb", "mean"): 0.002 * step**2, "train/loss": 1 / (1 + step)}
        row |= {"train/response_length": 12 - 0.5 * step, size_key("train", "prompts"): 8.0}
        row |= {size_key("train", "samples_per_prompt"): 4.0}
        for i, name in enumerate(functions):
            row[reward_key("train", f"{name}/mean")] = (i + 1) * 0.05 * step
        rows.append(row)
        if step % steps_per_epoch == steps_per_epoch - 1:
            val = {"epoch": epoch, "step": step + 1, reward_key("val", "mean"): 0.1 * step}
            val |= {reward_key("val", "sem_prompts"): 0.03, kl_key("val", "rb", "mean"): 0.002 * step**2}
            rows.append(val | {kl_key("val", "rb", "sem_prompts"): 0.001})
    columns = {key for row in rows for key in row}
    return [{key: row.get(key, math.nan) for key in columns} for row in rows]


def drawn_series(fig) -> dict[str, dict[str, np.ndarray]]:
    """Each panel's series by label, keyed by the panel's title: [K, 2] arrays of (step, value)."""
    panels = {}
    for ax in fig.axes:
        series = {line.get_label(): line.get_xydata() for line in ax.lines if not line.get_label().startswith("_")}
        series |= {bars.get_label(): bars.lines[0].get_xydata() for bars in ax.containers}
        panels[ax.get_title()] = series
    return panels


TRAINING = "training: mean as logged at each step"
VALIDATION = "validation: mean over held-out prompts, 1 s.e."


@pytest.mark.parametrize("functions", [(), ("exact_match", "format")])
def test_the_training_curves_draw_every_logged_series_at_its_steps(functions, tmp_path):
    rows = metrics_rows(functions)
    fig = plots.training_curves(rows, reward_name="weighted_sum")
    fig.savefig(tmp_path / f"training_curves_{len(functions)}.png")

    def logged(key):
        return np.array([(r["step"], r[key]) for r in rows if not math.isnan(r[key])])

    reward = {TRAINING: logged(reward_key("train", "mean")), VALIDATION: logged(reward_key("val", "mean"))}
    reward |= {f"reward function: {name}": logged(reward_key("train", f"{name}/mean")) for name in functions}
    expected = {
        "reward: weighted_sum": reward,
        "KL(policy || reference), RB  [nats]": {
            TRAINING: logged(kl_key("train", "rb", "mean")),
            VALIDATION: logged(kl_key("val", "rb", "mean")),
        },
        "loss": {TRAINING: logged("train/loss")},
        "response length  [tokens]": {TRAINING: logged("train/response_length")},
    }
    drawn = drawn_series(fig)
    assert drawn.keys() == expected.keys()
    for title, series in expected.items():
        assert drawn[title].keys() == series.keys(), title
        for label, points in series.items():
            assert len(points) == (12 if label != VALIDATION else 3), (title, label)
            np.testing.assert_array_equal(drawn[title][label], points, err_msg=f"{title}: {label}")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sorted(legend) == sorted(reward), "one legend entry per kind of line"
    assert "n = 8 prompts x M = 4 samples" in fig.texts[0].get_text()


def test_a_panel_with_nothing_logged_says_so():
    rows = [{k: v for k, v in row.items() if k != "train/response_length"} for row in metrics_rows()]
    fig = plots.training_curves(rows)
    length = next(ax for ax in fig.axes if ax.get_title().startswith("response length"))
    assert not length.lines and [t.get_text() for t in length.texts] == ["not logged"]
    assert fig.axes[0].get_title() == "reward"


def test_the_training_curves_png_is_the_figure_of_the_runs_metrics_csv(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [{k: float(v) if v else math.nan for k, v in row.items()} for row in csv.DictReader(f)]
    fig = plots.training_curves(rows, reward_name="VaderSentimentReward")
    drawn = drawn_series(fig)
    trained = len([r for r in rows if not math.isnan(r["train/loss"])])
    assert trained >= 4
    for title in drawn:
        assert len(drawn[title][TRAINING]) == trained, title
    assert len(drawn["reward: VaderSentimentReward"][VALIDATION]) == 2
    fig.savefig(run_dir / "redrawn.png")
    assert (run_dir / "redrawn.png").read_bytes() == (run_dir / "plots" / "training_curves.png").read_bytes()
