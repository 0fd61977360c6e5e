"""LightningCLI for this project: default loggers and callbacks, resuming in place, exit codes.

`python train.py fit --config configs/default.yaml` trains; `--ckpt_path last` (or a path)
resumes the newest run of that logger name in its own folder (runs.py). Values given now, in
config files or on the command line, win over the checkpoint's; anything not given comes from
the checkpoint, the reward included. SIGTERM and SIGINT save a checkpoint of the current step
and exit with 143 and 130, so a scheduler never mistakes an interrupted run for a finished one.
`test --ckpt_path` of a run's checkpoint reports into that run's folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import typing
import warnings
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from ..training.data import PromptDataModule
from ..training.lightning_internals import ExplicitValuesWin
from ..training.module import RBKLModule
from ..training.options import option_groups
from ..training.rewards import reward_config
from .cli_errors import OneSentenceParser, refuse, report_error, yaml_syntax_error
from .folders import (
    LastCheckpoint,
    RunLogger,
    UnreadableCheckpoint,
    drop_rows_after,
    find_last_checkpoint,
    model_config,
    nothing_left_to_train,
    objective_changes,
    objective_changes_warning,
    readable_checkpoint,
    record_objective_changes,
    resume_config_name,
    run_version,
    stop_report,
)

PACKAGE = __name__.split(".")[0]
EXIT_SIGTERM, EXIT_SIGINT = 128 + signal.SIGTERM, 128 + signal.SIGINT
SUBCOMMANDS = ("fit", "validate", "test", "predict")
HELP = (
    "The model's own options (--model.init_args.NAME, documented where RBKLModule declares them) are "
    "listed by:  python train.py fit --model.help RBKLModule"
)


class CLI(ExplicitValuesWin, LightningCLI):
    def __init__(self, *args, **kwargs):
        self.argv: list[str] | None = None  # the command line, to print the one that continues the run
        self.runs_before: set[Path] = set()  # the logger's run folders before this start
        self.changed_objective: dict[str, tuple] = {}  # objective settings a resumed fit changed: said at its end
        self.run_dir: Path | None = None  # the run folder a resume or a test of a checkpoint writes into
        try:
            super().__init__(*args, **kwargs)
        except BaseException as error:
            if isinstance(error, SIGTERMException) or CTRL_C.stopped_at_once:
                self._report_stop()
            else:
                self._remove_failed_start()
            raise

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        # No option is taken from its first letters: --trainer.max_epoch is a typo, not max_epochs.
        self.parser_class = OneSentenceParser
        return super().init_parser(allow_abbrev=False, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # last.ckpt every N optimizer steps, at the end, and on SIGTERM/SIGINT (the current step):
        # `--ckpt_path last` resumes from it. Epoch checkpoints come from the callback list below.
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.every_n_train_steps": 50,
                "last_checkpoint.save_last": True,
                "last_checkpoint.save_top_k": 0,
                "last_checkpoint.save_on_exception": True,
                # Always last.ckpt, never last-v1.ckpt beside a stale one that --ckpt_path last would find.
                "last_checkpoint.enable_version_counter": False,
                # Every run leaves logs/<name>/version_N/metrics.csv and plots/; a config may replace these.
                "trainer.logger": {
                    "class_path": f"{PACKAGE}.runs.folders.RunLogger",
                    "init_args": {"save_dir": "logs"},
                },
                "trainer.callbacks": [
                    {"class_path": f"{PACKAGE}.runs.display.RunProgressBar"},
                    {"class_path": f"{PACKAGE}.runs.display.RunModelSummary"},
                    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"},
                    {"class_path": f"{PACKAGE}.reports.callbacks.RewardVsKLPlot"},
                    {"class_path": f"{PACKAGE}.reports.callbacks.EstimatorVariancePlot"},
                    {"class_path": f"{PACKAGE}.reports.callbacks.TrainingCurvesPlot"},
                    {
                        "class_path": f"{PACKAGE}.reports.callbacks.GradVariancePlot"
                    },  # draws once track_grad_variance logs
                    {"class_path": f"{PACKAGE}.reports.callbacks.EstimatorTable"},
                    {"class_path": f"{PACKAGE}.reports.callbacks.SampleTable"},
                    {"class_path": f"{PACKAGE}.reports.callbacks.KLReport"},
                ],
            }
        )

    # -- resuming --------------------------------------------------------------------------------

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        self.resumed_from: tuple[Path, dict] | None = None
        if args is not None and not isinstance(args, list | tuple):  # a dict or Namespace from Python
            return super().parse_arguments(parser, args)
        argv = list(sys.argv[1:] if args is None else args)
        self.argv = list(argv)
        if sentence := yaml_syntax_error(argv):
            refuse(sentence)
        argv = nulls_as_groups(argv)
        subcommand, ckpt_path = _subcommand_and_checkpoint(argv)
        if ckpt_path is None:
            # What LightningCLI.parse_arguments does, without its warning that a list was given
            # while sys.argv holds one: the list is sys.argv, rewritten.
            self.config = parser.parse_args(argv)
            return None
        if ckpt_path == "last":
            # Which run is the newest of this logger name: the config must be parsed to know.
            self.config = parser.parse_args(argv)
            path = self._last_checkpoint(subcommand)
        else:
            path = Path(ckpt_path)
            if not path.is_file():
                sys.exit(f"error: --ckpt_path {ckpt_path}: no such checkpoint file")
        try:
            path, saved = readable_checkpoint(path, fall_back=ckpt_path == "last")
        except UnreadableCheckpoint as error:
            sys.exit(f"error: {error}")
        try:
            saved_model = model_config(saved["hparams"])
        except ValueError as error:  # a checkpoint this project cannot read the options of
            sys.exit(f"error: {path}: {error}")
        if saved_model is not None:
            argv = checkpoint_settings_first(argv, subcommand, saved_model)
        self.config = parser.parse_args(argv)
        self.config[subcommand]["ckpt_path"] = str(path)
        if subcommand == "fit":
            trainer = self.config["fit"]["trainer"]
            if done := nothing_left_to_train(path, saved, trainer.get("max_epochs"), trainer.get("max_steps")):
                # A finished run resumed again (a requeued job, a sweep run again) is no failure.
                if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
                    sys.stderr.write(done + "\n")
                sys.exit(0)
            if saved_model is not None:
                now = self.config["fit"]["model"]["init_args"].as_dict()
                self.changed_objective = objective_changes(saved_model["init_args"], now)
        self.resumed_from = (path, saved)

    def _logger_args(self, subcommand: str):
        """The logger's init_args in the parsed config (empty when the logger is off or not configurable)."""
        logger = self.config[subcommand]["trainer"].get("logger")
        return (logger.get("init_args") if hasattr(logger, "get") else None) or {}

    def _last_checkpoint(self, subcommand: str) -> Path:
        init = self._logger_args(subcommand)
        save_dir, name = init.get("save_dir", "logs"), init.get("name", "default")
        found = find_last_checkpoint(save_dir, name)
        if found is None:
            sys.exit(
                f"error: --ckpt_path last: no {save_dir}/{name}/version_*/checkpoints/last.ckpt to resume "
                "from (give the checkpoint's path, or train without --ckpt_path)"
            )
        return found

    def before_instantiate_classes(self) -> None:
        init = self._logger_args(self.subcommand) if self.subcommand else {}
        if init:
            self.runs_before = set(Path(init.get("save_dir", "logs"), init.get("name") or "").glob("version_*"))
        trainer = self.config[self.subcommand]["trainer"] if self.subcommand else None
        if trainer is not None and trainer.get("enable_progress_bar") is False and trainer.get("callbacks"):
            # Batch jobs switch bars off; Lightning refuses a progress bar among the callbacks then.
            trainer.callbacks = [
                c for c in trainer.callbacks if not str(c.get("class_path", "")).endswith("ProgressBar")
            ]
        if trainer is not None and trainer.get("enable_model_summary") is False and trainer.get("callbacks"):
            trainer.callbacks = [c for c in trainer.callbacks if not str(c.get("class_path", "")).endswith("Summary")]
        if self.resumed_from is None or self.subcommand not in ("fit", "test"):
            return
        path, saved = self.resumed_from
        version = run_version(path)
        init = self._logger_args(self.subcommand)
        if version is None or not init:
            return
        if self.subcommand == "test":
            # The report of a checkpoint goes beside it, in the run that trained it, whatever the
            # config's logger names.
            self.run_dir = path.parent.parent
            init.save_dir, init.name, init.version = str(self.run_dir.parent.parent), self.run_dir.parent.name, version
            self.save_config_kwargs["config_filename"] = resume_config_name(self.run_dir, saved["global_step"], "test")
            return
        # Continue the run the checkpoint belongs to: one folder, one metrics.csv, one curve.
        init.version = version
        step = saved["global_step"]
        run_dir = self.run_dir = Path(init.save_dir, init.name or "", f"version_{version}")
        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
            dropped = drop_rows_after(run_dir / "metrics.csv", step)
            if dropped:
                print(f"resuming {run_dir} at step {step}: dropped {dropped} metrics rows logged after it")
            record_objective_changes(run_dir, step, self.changed_objective)
        # The first run's config.yaml stays; this resume's is written beside it (a second resume
        # of the same checkpoint, after another interruption, gets a name of its own).
        self.save_config_kwargs["config_filename"] = resume_config_name(run_dir, step)

    def _report_stop(self) -> None:
        """One line: where the run stopped, what was saved, and the command that continues it."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.is_global_zero:
            return
        cause = "Ctrl-C" if CTRL_C.presses else "SIGTERM"
        if self.subcommand != "fit":
            sys.stderr.write(f"{self.subcommand} stopped by {cause}: it has nothing to continue from, run it again\n")
            return
        saver = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        path = Path(saver.dirpath, "last.ckpt") if saver is not None and saver.dirpath else None
        sys.stderr.write(stop_report(cause, path, self.argv, saved_now=not CTRL_C.stopped_at_once) + "\n")

    def _remove_failed_start(self) -> None:
        """A start that failed before its first step leaves no run folder behind (nor one half filled)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.is_global_zero or trainer.global_step > 0 or trainer.logger is None:
            return
        run_dir = Path(trainer.logger.log_dir)
        if run_dir.is_dir() and run_dir not in self.runs_before and not any(run_dir.rglob("*.ckpt")):
            shutil.rmtree(run_dir)

    def after_fit(self) -> None:
        run_dir = self.trainer.log_dir  # every rank: a broadcast under DDP
        if self.trainer.is_global_zero and run_dir:
            files = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(run_dir).iterdir())
            print(f"\nRun folder: {run_dir}\n  " + "  ".join(files))
        if self.trainer.is_global_zero and self.changed_objective and self.resumed_from is not None:
            # Last, after Lightning's output, where it is read; the run folder keeps it too.
            step = self.resumed_from[1]["global_step"]
            sys.stdout.flush()
            sys.stderr.write(objective_changes_warning(self.changed_objective, step, self.run_dir) + "\n")

    def test(self, **kwargs) -> None:
        # The KL report (callbacks.KLReport) is the table of a test run: Lightning's own would
        # repeat its numbers after it, with a reward of 0.0 where there is none.
        self.trainer.test(**{**kwargs, "verbose": False})
        self._stop_if_signalled()

    def validate(self, **kwargs) -> None:
        self.trainer.validate(**kwargs)
        self._stop_if_signalled()

    def _stop_if_signalled(self) -> None:
        # Lightning's evaluation loop ignores a SIGTERM (or Ctrl-C) that arrives during its last
        # batch and returns as if nothing happened: a scheduler would take the run for finished.
        if self.trainer.received_sigterm:
            raise SIGTERMException

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The reward is an object, so the module does not save it; its config goes into the
        # checkpoint here, and a resume from the command line alone gets it back.
        reward = self.config[self.subcommand]["model"]["init_args"].get("reward") if self.subcommand else None
        self.model.hparams["reward"] = reward_config(reward)
        if self.subcommand == "test" and self.run_dir is not None and isinstance(self.trainer.logger, RunLogger):
            self.trainer.logger.record_hparams = False


def _subcommand_and_checkpoint(argv: list[str]) -> tuple[str | None, str | None]:
    """The subcommand and the value of --ckpt_path in a command line, as given."""
    subcommand = next((a for a in argv if a in SUBCOMMANDS), None)
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return subcommand, argv[i + 1]
        if arg.startswith("--ckpt_path="):
            return subcommand, arg.split("=", 1)[1]
    return subcommand, None


MODEL_ARGS = "--model.init_args."
YAML_NULLS = ("null", "Null", "NULL", "~")


def nulls_as_groups(argv: list[str]) -> list[str]:
    """`--model.init_args.GROUP.FIELD=null` (or `... null`) as `--model.init_args.GROUP={"FIELD": null}`.

    jsonargparse (4.53) hands the dotted form's null to a field of a dataclass group inside
    init_args as the string 'None' and refuses it ("expected float or null, got 'None'"), so
    `--model.init_args.objective.clip_range=null` could not switch clipping off. The group form
    is merged into the group, the other fields kept, also through a nested group
    (`sampling.vllm.max_model_len` becomes `sampling={"vllm": {"max_model_len": null}}`). Only
    fields of the module's dataclass groups are rewritten: a dict option given this way would be
    replaced whole.
    """
    out, i = [], 0
    while i < len(argv):
        key, equals, value = argv[i].partition("=")
        if not equals and i + 1 < len(argv):
            value = argv[i + 1]
        names = key.removeprefix(MODEL_ARGS).split(".")
        if value in YAML_NULLS and key.startswith(MODEL_ARGS) and dataclass_field(names):
            nested = None
            for name in reversed(names[1:]):
                nested = {name: nested}
            out.append(f"{MODEL_ARGS}{names[0]}={json.dumps(nested)}")
            i += 1 if equals else 2
            continue
        out.append(argv[i])
        i += 1
    return out


def dataclass_field(names: list[str]) -> bool:
    """Whether model.init_args.<names...> is a field of one of the module's option groups."""
    kind = option_groups().get(names[0])
    for name in names[1:]:
        if not dataclasses.is_dataclass(kind):
            return False
        kind = typing.get_type_hints(kind).get(name)
    return len(names) > 1 and kind is not None


def checkpoint_settings_first(argv: list[str], subcommand: str, model: dict) -> list[str]:
    """The command line with the checkpoint's model settings given first, right after the subcommand.

    jsonargparse applies arguments in order, so every config file and option given now, all later
    in argv, wins over the checkpoint's settings, and what is not given now stays the checkpoint's.
    LightningCLI's own reading of a checkpoint's hyperparameters (`_parse_ckpt_path`, switched off
    by ExplicitValuesWin) merges them after the command line, over the values given now, and loads
    the whole file where folders.read_checkpoint maps it.
    """
    at = argv.index(subcommand) + 1
    return [*argv[:at], "--model", json.dumps(model), *argv[at:]]


class _DropTips(logging.Filter):
    """Lightning's advertising tips and bookkeeping notes: not what a first run should print."""

    NOISE = (
        "💡 Tip:",
        "Loading `train_dataloader` to estimate",
        "Trainer already configured with model summary",
        # Logged at each save that does not say weights_only; every save here holds the whole state.
        "`weights_only` was not set, defaulting to `False`.",
    )
    # The stop is reported in one line of our own (CLI._report_stop), which names the checkpoint.
    SAID_ELSEWHERE = ("Received SIGTERM", "Bypassing SIGTERM", "Detected KeyboardInterrupt")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not message.startswith(self.NOISE) and not any(said in message for said in self.SAID_ELSEWHERE)


def _quiet() -> None:
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if not any(isinstance(f, _DropTips) for f in handler.filters):  # main() may run many times (tests)
            handler.addFilter(_DropTips())
    # The models stay in eval mode on purpose (dropout off, docs/estimators.md §6), and the
    # LeafSpec notice is Lightning's own deprecation, which a user cannot act on.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # The data order continues mid-epoch by itself (data.EpochShuffle), which Lightning cannot see.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    # A resume writes into its own run folder on purpose (runs.py), where the checkpoints already are.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Under DDP, Lightning advises sync_dist for every value logged at epoch level; these are
    # torchmetrics states, merged across ranks exactly (training/metrics.py), so the advice is wrong here.
    warnings.filterwarnings(
        "ignore",
        message=r"It is recommended to use `self\.log\('[^']+', \.\.\., sync_dist=True\)` when logging on epoch level "
        r"in distributed setting to accumulate the metric across devices\.",
        category=PossibleUserWarning,
    )


class CtrlC:
    """Ctrl-C while training stops the run as SIGTERM does: at the end of the batch in flight (and of
    its validation), with last.ckpt saved. A second Ctrl-C stops at once and saves nothing: a batch cut
    short may have taken some of its optimizer steps, and the previous last.ckpt resumes exactly."""

    def __init__(self) -> None:
        self.presses = 0

    @property
    def stopped_at_once(self) -> bool:
        return self.presses > 1

    def __call__(self, signum, frame) -> None:
        self.presses += 1
        lightning_handler = signal.getsignal(signal.SIGTERM)  # callable while a trainer runs
        if self.presses == 1 and callable(lightning_handler):
            sys.stderr.write("\nCtrl-C: stopping after this batch and saving (press again to stop at once, unsaved)\n")
            lightning_handler(signal.SIGTERM, frame)
        else:
            self.presses = max(self.presses, 2)
            raise KeyboardInterrupt


CTRL_C = CtrlC()


def leave_process_group() -> None:
    """Every rank done: leave the process group together. Left to Lightning's atexit hook, each rank
    tears gloo down on its own, and a 2-process CPU run once ended in an abort at exit
    ("terminate called without an active exception") after training had finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(args=None) -> CLI:
    """Run the CLI. Errors end with one line `error: <sentence>` (RBKL_TRACEBACK=1: the traceback)."""
    _quiet()
    CTRL_C.presses = 0
    previous = signal.signal(signal.SIGINT, CTRL_C)
    try:
        cli = CLI(
            RBKLModule,
            PromptDataModule,
            subclass_mode_model=True,
            parser_kwargs={"parser_mode": "omegaconf", **{stage: {"description": HELP} for stage in SUBCOMMANDS}},
            args=args,
        )
        leave_process_group()
        return cli
    except SIGTERMException:
        # LastCheckpoint saved the checkpoint and CLI printed how to continue.
        sys.exit(EXIT_SIGINT if CTRL_C.presses else EXIT_SIGTERM)
    except KeyboardInterrupt:  # before the trainer ran: nothing to save
        sys.exit(EXIT_SIGINT)
    except SystemExit as exit_:
        if CTRL_C.presses and exit_.code not in (0, None):
            sys.exit(EXIT_SIGINT)
        raise
    except Exception as error:
        if os.environ.get("RBKL_TRACEBACK"):
            raise
        report_error(error)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGINT, previous)
