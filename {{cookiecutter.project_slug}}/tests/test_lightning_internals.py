"""Each private Lightning name the project uses (lightning_internals.py) still exists and works as used.

A failure here means the pinned Lightning range in pyproject.toml was widened to a release that
renamed or changed one of them: mend lightning_internals.py before widening it.
"""

import csv
import dataclasses
import datetime
import inspect
import os
import signal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from {{ cookiecutter.package_name }}.runs.folders import RunLogger
from {{ cookiecutter.package_name }}.training.lightning_internals import (
    attached_trainer,
    batches_done_in_restarted_epoch,
    every_n_train_steps,
    last_saved_step,
    plain_hyperparameters,
    saves_on_a_timer,
)


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_csv_writer_checks_its_folder_in_the_method_replaced_and_a_resumed_run_appends(tmp_path):
    assert parameters(ExperimentWriter._check_log_dir_exists) == ["self"]
    run = tmp_path / "run" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("a,step\n1.0,0\n")
    logger = RunLogger(str(tmp_path), name="run", version=0)
    logger.log_metrics({"a": 2.0}, step=1)
    logger.save()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [(r["step"], r["a"]) for r in rows] == [("0", "1.0"), ("1", "2.0")]


def test_model_checkpoint_still_has_what_step_saves_call():
    callback = ModelCheckpoint(every_n_train_steps=3)
    assert every_n_train_steps(callback) == 3 and not saves_on_a_timer(callback) and last_saved_step(callback) == 0
    assert callback._defer_save_until_validation is False
    timed = ModelCheckpoint(train_time_interval=datetime.timedelta(minutes=5))
    assert saves_on_a_timer(timed) and timed._train_time_interval.total_seconds() == 300
    assert timed._last_time_checked is None  # set by on_train_start, read by train_time_due
    assert "_last_time_checked = time.monotonic()" in inspect.getsource(ModelCheckpoint.on_train_start)
    assert parameters(ModelCheckpoint._should_skip_saving_checkpoint) == ["self", "trainer"]
    assert parameters(ModelCheckpoint._monitor_candidates) == ["self", "trainer"]
    for name in ("_save_topk_checkpoint", "_save_last_checkpoint"):
        assert parameters(getattr(ModelCheckpoint, name)) == ["self", "trainer", "monitor_candidates"], name


def test_the_fit_loop_counts_the_finished_batches_where_the_data_order_reads_them():
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    loop = trainer.fit_loop
    assert loop.restarting is False and loop.epoch_loop.batch_progress.current.completed == 0
    assert batches_done_in_restarted_epoch(trainer) == 0 and batches_done_in_restarted_epoch(None) == 0


def test_both_copies_of_the_saved_hyperparameters_are_converted():
    @dataclasses.dataclass
    class Group:
        x: int = 1

    class Module(L.LightningModule):
        def __init__(self, group: Group = Group()):  # noqa: B008
            super().__init__()
            self.save_hyperparameters()

    module = Module()
    plain_hyperparameters(module, dataclasses.asdict)
    assert module.hparams["group"] == {"x": 1} and module.hparams_initial["group"] == {"x": 1}


def test_a_module_without_a_trainer_says_so():
    assert attached_trainer(L.LightningModule()) is None


def test_the_cli_parses_ckpt_path_in_the_method_replaced():
    assert parameters(LightningCLI._parse_ckpt_path) == ["self"]
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI)


def test_the_loop_decides_validation_and_holds_sigterm_where_last_checkpoint_reads_them():
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    from {{ cookiecutter.package_name }}.training.lightning_internals import HeldSigterm

    assert parameters(_TrainingEpochLoop._should_check_val_fx) == ["self", "data_fetcher"]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    assert hasattr(trainer.fit_loop, "_data_fetcher")
    connector = trainer._signal_connector
    handled = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: handled.append(signum))
    try:
        held = HeldSigterm(trainer)
        os.kill(os.getpid(), signal.SIGTERM)
        assert handled == [] and signal.getsignal(signal.SIGTERM) == held._note
        held.release()
        assert handled == [signal.SIGTERM], "the handler it replaced gets the signal at the release"
        assert signal.getsignal(signal.SIGTERM) != held._note, "and is put back"
    finally:
        signal.signal(signal.SIGTERM, previous)
    connector.register_signal_handlers()
    try:
        held = HeldSigterm(trainer)
        os.kill(os.getpid(), signal.SIGTERM)
        assert trainer.received_sigterm is False, "noted while held, not acted on"
        held.release()
        assert trainer.received_sigterm is True, "Lightning's handler ran at the release: the loops read its flag"
        held = HeldSigterm(trainer)  # one received before the validation began
        assert trainer.received_sigterm is False
        held.release()
        assert trainer.received_sigterm is True
        connector.received_sigterm = False
        HeldSigterm(trainer).release()
        assert trainer.received_sigterm is False, "nothing received, nothing passed on"
    finally:
        connector.teardown()


def test_a_checkpoint_holds_the_loop_counters_that_start_next_epoch_afresh_resets():
    from {{ cookiecutter.package_name }}.training.lightning_internals import start_next_epoch_afresh

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    loop = trainer.fit_loop.state_dict()
    assert set(loop["epoch_progress"]["current"]) == {"ready", "started", "processed", "completed"}
    assert set(loop["epoch_loop.batch_progress"]) >= {"current", "is_last_batch"}
    # An epoch complete, its 8 batches still counted as the current epoch's.
    loop["epoch_progress"]["current"] = dict.fromkeys(loop["epoch_progress"]["current"], 1)
    loop["epoch_loop.batch_progress"]["current"] = dict.fromkeys(loop["epoch_loop.batch_progress"]["current"], 8)
    loop["epoch_loop.batch_progress"]["is_last_batch"] = True
    checkpoint = {"loops": {"fit_loop": loop}}
    start_next_epoch_afresh(checkpoint)
    assert set(loop["epoch_loop.batch_progress"]["current"].values()) == {0}
    assert loop["epoch_loop.batch_progress"]["is_last_batch"] is False
    # Mid-epoch (the epoch started, not completed): left as it is.
    loop["epoch_progress"]["current"]["ready"] = 2
    loop["epoch_loop.batch_progress"]["current"]["completed"] = 3
    start_next_epoch_afresh(checkpoint)
    assert loop["epoch_loop.batch_progress"]["current"]["completed"] == 3


def test_the_csv_writer_rewrites_and_writes_hparams_in_the_methods_replaced():
    assert parameters(ExperimentWriter._rewrite_with_new_header) == ["self", "fieldnames"]
    assert parameters(ExperimentWriter.log_hparams) == ["self", "params"]


def test_the_fit_loop_saves_the_finished_epochs_where_nothing_left_to_train_reads_them():
    from {{ cookiecutter.package_name }}.training.lightning_internals import epochs_finished

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit_loop.epoch_progress.current.processed = 3  # what FitLoop.done compares with max_epochs
    assert epochs_finished({"loops": {"fit_loop": trainer.fit_loop.state_dict()}}) == 3
    assert epochs_finished({}) == 0, "a checkpoint no fit wrote"
