"""LightningCLI for this project: default loggers and callbacks, resuming in place, exit codes.

`python train.py fit --config configs/default.yaml` trains; `--ckpt_path last` (or a path)
resumes the newest run of that logger name in its own folder (runs.py). Values given now, in
config files or on the command line, win over the checkpoint's; anything not given comes from
the checkpoint, the reward included. SIGTERM and SIGINT save a checkpoint of the current step
and exit with 143 and 130, so a scheduler never mistakes an interrupted run for a finished one.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import os
import re
import shutil
import signal
import sys
import traceback
import typing
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ..training.data import PromptDataModule
from ..training.lightning_internals import ExplicitValuesWin
from ..training.module import RBKLModule
from ..training.options import near_names, option_groups
from ..training.rewards import reward_config
from .folders import (
    LastCheckpoint,
    UnreadableCheckpoint,
    drop_rows_after,
    find_last_checkpoint,
    model_config,
    objective_changes,
    readable_checkpoint,
    resume_config_name,
    run_version,
    stop_report,
    warn_objective_changes,
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
        subcommand, ckpt_path = _subcommand_and_checkpoint(argv)
        if ckpt_path is None:
            return super().parse_arguments(parser, args)
        if ckpt_path == "last":
            # Which run is the newest of this logger name: the config must be parsed to know.
            super().parse_arguments(parser, args)
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
            # The checkpoint's model settings go first: every value given in a config file or on
            # the command line comes later and wins; what is not given stays the checkpoint's.
            at = argv.index(subcommand) + 1
            argv[at:at] = ["--model", json.dumps(saved_model)]
        self.config = parser.parse_args(argv)
        self.config[subcommand]["ckpt_path"] = str(path)
        if saved_model is not None:
            now = self.config[subcommand]["model"]["init_args"].as_dict()
            warn_objective_changes(objective_changes(saved_model["init_args"], now))
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
        if self.resumed_from is None or self.subcommand != "fit":
            return
        path, saved = self.resumed_from
        version = run_version(path)
        init = self._logger_args("fit")
        if version is None or not init:
            return
        # Continue the run the checkpoint belongs to: one folder, one metrics.csv, one curve.
        init.version = version
        step = saved["global_step"]
        run_dir = Path(init.save_dir, init.name or "", f"version_{version}")
        if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
            dropped = drop_rows_after(run_dir / "metrics.csv", step)
            if dropped:
                print(f"resuming {run_dir} at step {step}: dropped {dropped} metrics rows logged after it")
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


def _subcommand_and_checkpoint(argv: list[str]) -> tuple[str | None, str | None]:
    """The subcommand and the value of --ckpt_path in a command line, as given."""
    subcommand = next((a for a in argv if a in SUBCOMMANDS), None)
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return subcommand, argv[i + 1]
        if arg.startswith("--ckpt_path="):
            return subcommand, arg.split("=", 1)[1]
    return subcommand, None


def _moved_option(argv: list[str]) -> str | None:
    """'model.init_args.beta is now model.init_args.objective.beta' for an option of the old flat form."""
    groups = {f.name: group for group, cls in option_groups().items() for f in dataclasses.fields(cls)}
    for arg in argv:
        if isinstance(arg, str) and arg.startswith("--model.init_args."):
            name = arg.removeprefix("--model.init_args.").split("=", 1)[0]
            if name in groups:
                return (
                    f"model.init_args.{name} is now model.init_args.{groups[name]}.{name} (the options are grouped; "
                    "python train.py fit --model.help RBKLModule lists them)"
                )
    return None


def _innermost(error: BaseException) -> BaseException:
    """The exception at the bottom of a chain: the sentence our code raised, not a wrapper's."""
    # `raise ... from None` hides the context on purpose: the sentence is the one raised then.
    while (inner := error.__cause__ or (None if error.__suppress_context__ else error.__context__)) is not None:
        error = inner
    return error


class OneSentenceParser(LightningArgumentParser):
    """A parser that answers a mistake with one line, what was wrong and the fix, instead of its usage."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # a parser that reports to its caller (one alternative of a union)
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"error: {_explain_parse_error(message, parser)}\n")
        sys.exit(2)


@dataclasses.dataclass
class _ParseCause:
    """The gist of jsonargparse's nested error text: where, in which class, and what was wrong."""

    keys: list[str]
    class_path: str | None
    detail: str
    given: str | None


# Lines of jsonargparse's union report that say nothing about this mistake.
_UNION_NOISE = ("Does not validate against any", "Subtypes:", "Errors:", "Given value type:")


def _parse_cause(message: str) -> _ParseCause:
    """The innermost cause in jsonargparse's error text: a failed union or subclass keeps the real
    reason (an unknown key, an import error) in the lines above its "Does not validate" summary."""
    cause = _ParseCause([], None, "", None)
    expected: list[str] = []
    for line in (line.strip() for line in message.strip().splitlines()):
        if match := re.fullmatch(r'Parser key "(.+?)":(.*)', line):
            cause.keys.append(match[1])
            cause.detail, expected = match[2].strip(), []
        elif line.startswith("- Problem with given class_path '"):
            cause.class_path = line.split("'")[1]
            cause.detail, expected = "", []
        elif line.startswith("Given value:"):
            cause.given = cause.given or line.removeprefix("Given value:").strip()
        elif line.startswith("- Expected a <class '"):
            expected.append(line.split("'")[1].replace("NoneType", "null"))
        elif line and not line.startswith(_UNION_NOISE) and not cause.detail:
            cause.detail = line.removeprefix("- ")
    if not cause.detail and expected:
        cause.detail = f"expected {' or '.join(expected)}" + (f", got {cause.given!r}" if cause.given else "")
    cause.detail = cause.detail or message.strip().splitlines()[-1].strip()
    return cause


def _explain_parse_error(message: str, parser: LightningArgumentParser) -> str:
    """One sentence for a command line or config that does not parse: what was wrong, and the fix."""
    cause = _parse_cause(message)
    where = ".".join(["model", "init_args", *cause.keys[1:]] if cause.keys[:1] == ["model"] else cause.keys)
    detail = cause.detail
    if match := re.fullmatch(r"Option '(.+)' is not accepted before subcommand '(\w+)'", detail):
        return (
            f"options go after the subcommand: python train.py {match[2]} --config FILE [--other.options] "
            f"(--config or an option came before '{match[2]}')"
        )
    unknown = _unknown_options(detail)
    if unknown and cause.class_path:  # an option of a class given by class_path (the model, a reward)
        prefix = (where if where.endswith("init_args") else f"{where}.init_args") + "."
        known = _class_options(cause.class_path)
        listing = (
            f"python train.py fit --{prefix.removesuffix('.init_args.')}.help {cause.class_path.rsplit('.', 1)[-1]}"
        )
        return "; ".join(_unknown_option_sentence(prefix, name, known, listing) for name in unknown)
    if unknown:
        known = {option.lstrip("-") for option in parser._option_string_actions if option.startswith("--")}
        return "; ".join(_unknown_option_sentence("", name, known, "python train.py fit --help") for name in unknown)
    if cause.class_path and re.match(r"No module named|cannot import name|module '.+' has no attribute", detail):
        return (
            f"{where}: cannot import class_path {cause.class_path!r}: {detail} (a module of your own goes in "
            "the project root, next to train.py, which is on its import path)"
        )
    return f"{where}: {detail}" if where else detail


def _unknown_options(detail: str) -> list[str]:
    """The option names a jsonargparse message refuses as unknown, without dashes or values."""
    if detail.startswith("unrecognized arguments: "):
        given = detail.removeprefix("unrecognized arguments: ").split()
        return [arg.lstrip("-").split("=", 1)[0] for arg in given if arg.startswith("--")]
    if match := re.fullmatch(r"(?:Option|Key) '(.+)' is not (?:accepted|expected)", detail):
        return [match[1]]
    if match := re.fullmatch(r"Subcommand '\w+' does not accept option '(.+)'", detail):
        return [match[1]]
    return []


def _unknown_option_sentence(prefix: str, name: str, known: set[str], listing: str) -> str:
    """'--model.init_args.betta is not an option; near names: --model.init_args.objective.beta'."""
    option = prefix + name
    moved = _moved_option([f"--{option}"])
    if moved:
        return moved
    near = near_names(name, known)
    hint = f"; near names: {', '.join('--' + prefix + n for n in near)}" if near else ""
    return f"--{option} is not an option{hint} ({listing} lists them)"


def _class_options(class_path: str) -> set[str]:
    """The init arguments of a class, with the fields of option-group dataclasses as `group.field`."""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # the names are a hint; the sentence stands without them
        return set()
    names = set()
    for name in inspect.signature(cls.__init__).parameters:
        if name in ("self", "args", "kwargs"):
            continue
        names.add(name)
        for kind in (hints.get(name), *typing.get_args(hints.get(name))):
            if dataclasses.is_dataclass(kind):
                names |= {f"{name}.{field.name}" for field in dataclasses.fields(kind)}
    return names


def _explain_error(error: BaseException) -> str:
    """The sentence of an error raised while the classes are built, with the fix where it is known."""
    if match := re.fullmatch(r"Import path (\S+) does not correspond to a subclass of Reward", str(error)):
        return (
            f"model.init_args.reward: {match[1]} is not a Reward class; a reward function "
            f"(prompts, completions, **kwargs) -> list[float] is given by its dotted path alone: reward: {match[1]}"
        )
    return str(error)


def _refused_by_a_check(error: BaseException) -> bool:
    """A ValueError or FileNotFoundError raised in this package: one of its checks, whose message
    names the setting (a failure inside torch or a user's own code keeps its traceback)."""
    frames = traceback.extract_tb(error.__traceback__)
    package = Path(__file__).parents[1]
    return (
        isinstance(error, ValueError | FileNotFoundError)
        and bool(frames)
        and package in Path(frames[-1].filename).parents
    )


class _DropTips(logging.Filter):
    """Lightning's advertising tips and bookkeeping notes: not what a first run should print."""

    NOISE = ("💡 Tip:", "Loading `train_dataloader` to estimate", "Trainer already configured with model summary")
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


def main(args=None) -> CLI:
    """Run the CLI. Errors end with one line `error: <sentence>` (RBKL_TRACEBACK=1: the traceback)."""
    _quiet()
    CTRL_C.presses = 0
    previous = signal.signal(signal.SIGINT, CTRL_C)
    try:
        return CLI(
            RBKLModule,
            PromptDataModule,
            subclass_mode_model=True,
            parser_kwargs={"parser_mode": "omegaconf", **{stage: {"description": HELP} for stage in SUBCOMMANDS}},
            args=args,
        )
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
        root = _innermost(error)
        if root is error and not _refused_by_a_check(root):  # a failure while running: where it happened matters
            traceback.print_exception(error)
        else:  # a bad setting, refused by the config parser or by our checks: the sentence is what matters
            sys.stderr.write("(RBKL_TRACEBACK=1 shows the traceback)\n")
        sys.stderr.write(f"error: {_explain_error(root)}\n")
        sys.exit(1)
    finally:
        signal.signal(signal.SIGINT, previous)
