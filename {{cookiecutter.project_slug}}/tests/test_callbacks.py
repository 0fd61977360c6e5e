"""A 2-epoch offline run: the logged names tools rely on, the PNGs, the estimator table."""

import csv
import json
from pathlib import Path

import lightning as L
import pytest
from conftest import make_trainer
from matplotlib.image import imread

from {{ cookiecutter.package_name }}.callbacks import EstimatorTable, EstimatorVariancePlot, RewardVsKLPlot, SampleTable
from {{ cookiecutter.package_name }}.data import PromptDataModule
from {{ cookiecutter.package_name }}.estimators import LOGGED_ESTIMATORS, VALUE_ESTIMATORS
from {{ cookiecutter.package_name }}.metrics import KL_STATS
from {{ cookiecutter.package_name }}.module import RBKLModule
from {{ cookiecutter.package_name }}.options import Optimization, Sampling
from {{ cookiecutter.package_name }}.rewards import VaderSentimentReward


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    L.seed_everything(0)
    trainer = make_trainer(
        tmp,
        max_epochs=2,
        callbacks=[RewardVsKLPlot(estimators=["rb", "mc"]), EstimatorVariancePlot(), EstimatorTable(), SampleTable()],
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


def test_one_png_per_epoch_that_decodes_at_the_expected_size(run_dir):
    for stem in ("reward_vs_kl", "estimator_spread"):
        pngs = sorted((run_dir / "plots").glob(f"{stem}_epoch*.png"))
        assert [p.name for p in pngs] == [f"{stem}_epoch000.png", f"{stem}_epoch001.png"]
        for png in pngs:
            assert imread(png).shape == (480, 640, 4)


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
    assert list((Path(trainer.log_dir) / "plots").glob("reward_vs_kl_epoch000.png"))
