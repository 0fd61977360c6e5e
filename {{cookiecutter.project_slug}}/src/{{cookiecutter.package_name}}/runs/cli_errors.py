"""What train.py prints when a command line or config is refused: one line, what was wrong and the fix.

jsonargparse's messages are English, not an API: each rewrite of one is a named pattern in
`PATTERNS`, matched against the deepest cause of jsonargparse's report and tested on the pinned
release (tests/test_cli_errors.py triggers every pattern through train.py). A message that no
pattern matches is printed as jsonargparse wrote it: a message reworded upstream loses its
rewrite, never its meaning. A YAML syntax error is caught before jsonargparse reads the file,
which reports the line and column but not the file.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
import traceback
import typing
from collections.abc import Callable
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningArgumentParser

from ..training.options import near_names, option_groups


@dataclasses.dataclass
class Cause:
    """The gist of jsonargparse's nested report: where, in which class, and what was wrong."""

    keys: list[str]  # the `Parser key "..."` names, outermost first
    class_path: str | None  # the innermost class whose arguments were refused
    line: str  # the innermost line that says what was wrong
    expected: list[str]  # the types of a union that the value matched none of
    given: str | None  # the value as jsonargparse shows it

    @property
    def where(self) -> str:
        """The dotted option: jsonargparse names the model's keys without the init_args between."""
        return ".".join(["model", "init_args", *self.keys[1:]] if self.keys[:1] == ["model"] else self.keys)


# jsonargparse's summary of a failed union, and the lines that frame its alternatives' errors.
UNION_FAILED = "Does not validate against any of the Union subtypes"
_FRAME = ("Subtypes:", "Errors:", "Given value type:")


def innermost_cause(message: str) -> Cause:
    """The deepest cause in jsonargparse's report. A failed union or subclass says UNION_FAILED and
    keeps the reason (an unknown key, an import error) in the lines below it: each `Parser key` or
    class_path line starts a deeper level. A union whose alternatives only name the types they
    expected has UNION_FAILED itself as its cause."""
    cause, union = Cause([], None, "", [], None), False
    for line in (line.strip() for line in message.strip().splitlines()):
        if match := re.fullmatch(r'Parser key "(.+?)":(.*)', line):
            cause.keys.append(match[1])
            cause.line, cause.expected, union = match[2].strip(), [], False
        elif match := re.fullmatch(r"- Problem with given class_path '(.+)':", line):
            cause.class_path, cause.line, cause.expected, union = match[1], "", [], False
        elif line == UNION_FAILED:
            union = True
        elif line.startswith("Given value:"):
            cause.given = cause.given or line.removeprefix("Given value:").strip()
        elif match := re.fullmatch(r"- Expected a <class '(.+)'>", line):
            cause.expected.append(match[1])
        elif line and not line.startswith(_FRAME) and not cause.line:
            cause.line = line.removeprefix("- ")
    if not cause.line and union:
        cause.line = UNION_FAILED
    return cause


Sentence = Callable[[re.Match, Cause, LightningArgumentParser | None], str | None]


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A jsonargparse message this CLI rewrites: its name, the cause line it matches (whole), and
    the function that writes the sentence (None when the match lacks what the sentence needs)."""

    name: str
    regex: str
    sentence: Sentence


def _after_subcommand(match: re.Match, cause: Cause, parser) -> str:
    """'options go after the subcommand: python train.py fit --config FILE [--other.options] (...)'."""
    return (
        f"options go after the subcommand: python train.py {match['subcommand']} --config FILE [--other.options] "
        f"(--config or an option came before '{match['subcommand']}')"
    )


def _unknown_options(match: re.Match, cause: Cause, parser) -> str | None:
    """'--model.init_args.betta is not an option; near names: --model.init_args.objective.beta (...)'."""
    found = match.groupdict()
    if "given" in found:  # `unrecognized arguments: --a=1 --b 2`: the names, without dashes or values
        names = [arg.lstrip("-").split("=", 1)[0] for arg in found["given"].split() if arg.startswith("--")]
    else:
        names = [f"{found['group']}.{found['name']}" if found.get("group") else found["name"]]
    if not names:
        return None
    if cause.class_path:  # an option of a class given by class_path (the model, a reward, the logger)
        where = cause.where
        prefix = (where if where.endswith("init_args") else f"{where}.init_args") + "."
        known = _class_options(cause.class_path)
        owner = prefix.removesuffix(".init_args.")
        listing = f"python train.py fit --{owner}.help {cause.class_path.rsplit('.', 1)[-1]}"
    else:
        prefix, listing = "", "python train.py fit --help"
        options = parser._option_string_actions if parser is not None else {}
        known = {option.lstrip("-") for option in options if option.startswith("--")}
    return "; ".join(_unknown_option(prefix, name, known, listing) for name in names)


def _unknown_option(prefix: str, name: str, known: set[str], listing: str) -> str:
    option = prefix + name
    if moved := moved_option(option):
        return moved
    near = near_names(name, known)
    hint = f"; near names: {', '.join('--' + prefix + n for n in near)}" if near else ""
    return f"--{option} is not an option{hint} ({listing} lists them)"


def moved_option(option: str) -> str | None:
    """'model.init_args.beta is now model.init_args.objective.beta (...)' for a name of the options
    before they were grouped, which READMEs and notes of that time still show."""
    name = option.removeprefix("model.init_args.")
    groups = {f.name: group for group, cls in option_groups().items() for f in dataclasses.fields(cls)}
    if option.startswith("model.init_args.") and name in groups:
        return (
            f"model.init_args.{name} is now model.init_args.{groups[name]}.{name} (the options are grouped; "
            "python train.py fit --model.help RBKLModule lists them)"
        )
    return None


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


def _not_importable(match: re.Match, cause: Cause, parser) -> str | None:
    """ "model.init_args.reward: cannot import class_path 'my_rewards.Missing': No module named ... (...)"."""
    if not cause.class_path:
        return None
    return (
        f"{cause.where}: cannot import class_path {cause.class_path!r}: {match[0]} (a module of your own goes in "
        "the project root, next to train.py, which is on its import path)"
    )


def _reward_function(match: re.Match, cause: Cause, parser) -> str:
    """'model.init_args.reward: my_rewards.reward is not a Reward class; a reward function ... reward: ...'."""
    return (
        f"model.init_args.reward: {match['path']} is not a Reward class; a reward function "
        f"(prompts, completions, **kwargs) -> list[float] is given by its dotted path alone: reward: {match['path']}"
    )


def _expected_types(match: re.Match, cause: Cause, parser) -> str | None:
    """ "trainer.max_epochs: expected int or null, got 'two'" when every alternative is a plain type."""
    if not cause.expected or not cause.keys:
        return None
    types = " or ".join(dict.fromkeys(kind.replace("NoneType", "null") for kind in cause.expected))
    return f"{cause.where}: expected {types}" + (f", got {cause.given!r}" if cause.given else "")


def _keyed(match: re.Match, cause: Cause, parser) -> str | None:
    """jsonargparse's own line, after the option it is about: "data.batch_size: Expected a <class 'int'>..."."""
    return f"{cause.where}: {cause.line}" if cause.keys else None


PATTERNS = (
    Pattern(
        "option_before_subcommand",
        r"Option '.+' is not accepted before subcommand '(?P<subcommand>\w+)'",
        _after_subcommand,
    ),
    Pattern("unrecognized_arguments", r"unrecognized arguments: (?P<given>.+)", _unknown_options),
    Pattern("option_not_accepted", r"Option '(?P<name>.+)' is not accepted", _unknown_options),
    Pattern("subcommand_refuses_option", r"Subcommand '\w+' does not accept option '(?P<name>.+)'", _unknown_options),
    Pattern("group_refuses_option", r"Group '(?P<group>.+)' does not accept option '(?P<name>.+)'", _unknown_options),
    Pattern(
        "class_path_not_importable",
        r"(?:No module named|cannot import name|module '.+' has no attribute) .+",
        _not_importable,
    ),
    Pattern(
        "not_a_reward_class", r"Import path (?P<path>\S+) does not correspond to a subclass of Reward", _reward_function
    ),
    Pattern("no_union_type_fits", re.escape(UNION_FAILED), _expected_types),
    Pattern("wrong_type", r"Expected a .+\. Got value: .*", _keyed),
    Pattern("missing_file", r"File does not exist: .+", _keyed),
)


def explain(message: str, parser: LightningArgumentParser | None = None) -> tuple[str | None, str]:
    """(the pattern's name, its sentence) for a jsonargparse message; (None, the message) where none matches."""
    return first_match(innermost_cause(message), parser) or (None, message.strip())


def first_match(cause: Cause, parser: LightningArgumentParser | None) -> tuple[str, str] | None:
    for pattern in PATTERNS:
        match = re.fullmatch(pattern.regex, cause.line)
        if match and (sentence := pattern.sentence(match, cause, parser)):
            return pattern.name, sentence
    return None


class OneSentenceParser(LightningArgumentParser):
    """A parser that answers a mistake with one line, what was wrong and the fix, instead of its usage."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # a parser that reports to its caller (one alternative of a union)
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        refuse(explain(message, parser)[1])


def refuse(sentence: str) -> typing.NoReturn:
    sys.stderr.write(f"error: {sentence}\n")
    sys.exit(2)


def yaml_syntax_error(argv: list[str]) -> str | None:
    """'configs/x.yaml, line 3, column 1: did not find expected ',' or ']' (while parsing a flow
    sequence at line 2, column 15)' for the first --config file that is not valid YAML."""
    for path in _config_files(argv):
        try:
            for _ in yaml.parse(path.read_text(), Loader=yaml.SafeLoader):  # syntax only, no values built
                pass
        except yaml.MarkedYAMLError as error:
            if error.problem_mark is None:
                continue  # nothing to point at: jsonargparse reports it
            mark, context = error.problem_mark, error.context_mark
            sentence = f"{path}, line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
            if error.context and context is not None and (context.line, context.column) != (mark.line, mark.column):
                sentence += f" ({error.context} at line {context.line + 1}, column {context.column + 1})"
            if "'\\t'" in (error.problem or ""):
                sentence += "; YAML indents with spaces, not tabs"
            return sentence
    return None


def _config_files(argv: list[str]) -> list[Path]:
    values = [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]
    values += [arg.removeprefix("--config=") for arg in argv if arg.startswith("--config=")]
    return [Path(value) for value in values if Path(value).is_file()]


# -- errors raised while the classes are built or run ----------------------------------------------


def _no_gpu(match: re.Match, cause: Cause, parser) -> str:
    """'trainer.accelerator=gpu: no GPU is visible on this machine; use cpu or auto'."""
    return "trainer.accelerator=gpu: no GPU is visible on this machine; use cpu or auto"


def _accelerator_missing(match: re.Match, cause: Cause, parser) -> str:
    """'trainer.accelerator=cuda: no CUDA device is visible on this machine; use cpu or auto'."""
    kind = match["accelerator"].removesuffix("Accelerator")
    choices = [*re.findall(r"'(\w+)'", match["available"]), "auto"]
    return (
        f"trainer.accelerator={kind.lower()}: no {kind} device is visible on this machine; use {' or '.join(choices)}"
    )


# Lightning's refusals of a trainer setting the machine cannot honour, raised when the Trainer is
# built (lightning/pytorch/trainer/connectors/accelerator_connector.py, tested through train.py in
# tests/test_mistakes.py): a setting was wrong, so the sentence replaces the traceback.
SETTING_PATTERNS = (
    Pattern("no_gpu_backend", r"No supported gpu backend found!", _no_gpu),
    Pattern(
        "accelerator_not_available",
        r"`(?P<accelerator>\w+)` can not run on your system since the accelerator is not available\. "
        r"The following accelerator\(s\) is available and can be passed into `accelerator` argument of "
        r"`Trainer`: \[(?P<available>.*)\]\.",
        _accelerator_missing,
    ),
)


def explain_error(error: BaseException) -> str:
    """The sentence of an error raised after parsing: a pattern's where one matches (jsonargparse
    refuses a reward function given as class_path only when it builds it), else the error's own."""
    found = refused_setting(error) or first_match(Cause([], None, str(error), [], None), None)
    return found[1] if found else str(error)


def refused_setting(error: BaseException) -> tuple[str, str] | None:
    """(the pattern's name, its sentence) when Lightning refused a trainer setting (SETTING_PATTERNS)."""
    cause = Cause([], None, str(error), [], None)
    for pattern in SETTING_PATTERNS:
        if match := re.fullmatch(pattern.regex, cause.line):
            return pattern.name, pattern.sentence(match, cause, None)
    return None


def report_error(error: Exception) -> None:
    """`error: <sentence>` last; the traceback before it only where it says where something broke."""
    root = innermost_exception(error)
    if root is error and not refused_by_a_check(root) and not refused_setting(root):
        # a failure while running: where it happened matters
        traceback.print_exception(error)
    else:  # a bad setting, refused by the config parser or by our checks: the sentence is what matters
        sys.stderr.write("(RBKL_TRACEBACK=1 shows the traceback)\n")
    sys.stderr.write(f"error: {explain_error(root)}\n")


def innermost_exception(error: BaseException) -> BaseException:
    """The exception at the bottom of a chain: the sentence our code raised, not a wrapper's."""
    # `raise ... from None` hides the context on purpose: the sentence is the one raised then.
    while (inner := error.__cause__ or (None if error.__suppress_context__ else error.__context__)) is not None:
        error = inner
    return error


def refused_by_a_check(error: BaseException) -> bool:
    """A ValueError or FileNotFoundError raised in this package: one of its checks, whose message
    names the setting (a failure inside torch or a user's own code keeps its traceback)."""
    frames = traceback.extract_tb(error.__traceback__)
    package = Path(__file__).parents[1]
    return (
        isinstance(error, ValueError | FileNotFoundError)
        and bool(frames)
        and package in Path(frames[-1].filename).parents
    )
