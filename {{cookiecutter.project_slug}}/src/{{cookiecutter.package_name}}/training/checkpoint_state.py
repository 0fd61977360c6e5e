"""What the module checks in a checkpoint, and keeps of it: only the weights that train (the
reference and the reward are rebuilt from the config)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .options import option_groups


def keep_only(checkpoint: dict[str, Any], keys: Sequence[str]) -> None:
    state, kept = checkpoint["state_dict"], set(keys)
    for key in [k for k in state if k not in kept]:
        del state[key]


def check_grouped(hparams: Mapping[str, Any]) -> None:
    """Refuses hyperparameters written before the options were grouped (`beta`, `lr`, ... at the top
    level, no `objective` or `optimization`): the module would drop them and train its defaults
    silently."""
    examples = []  # (flat name, grouped name): one for each group found flat
    for group, cls in option_groups().items():
        flat = [field.name for field in dataclasses.fields(cls) if field.name in hparams]
        if flat and group not in hparams:
            examples.append((flat[0], f"{group}.{flat[0]}"))
    if examples:
        shown = examples[:2]
        raise ValueError(
            f"the checkpoint was written before the options were grouped ({', '.join(old for old, _ in shown)}, ... "
            f"at the top level of its hyperparameters, not {', '.join(new for _, new in shown)}, ...): this project "
            "does not read such checkpoints; train again, or continue it with the template release that wrote it"
        )


def fill_left_out(checkpoint: dict[str, Any], rebuilt: Mapping[str, Any]) -> None:
    """The weights a checkpoint leaves out on purpose (the reference, a LoRA adapter's base) taken
    from the module that rebuilt them from its config, so that Lightning's non-strict load does
    not list them as missing (a 30-key warning for a LoRA checkpoint of the tiny model)."""
    for key, value in rebuilt.items():
        checkpoint["state_dict"].setdefault(key, value)


def check_holds(checkpoint: dict[str, Any], keys: Sequence[str]) -> None:
    # Loading is not strict (the reference is left out on purpose), so a checkpoint that lacks
    # policy weights would otherwise load silently and train from the initial weights.
    missing = [k for k in keys if k not in checkpoint["state_dict"]]
    if missing:
        raise ValueError(
            f"the checkpoint lacks {len(missing)} of the policy's weights (e.g. {missing[0]!r}): it was not "
            "written for this policy"
        )


def save_trained_only(checkpoint: dict[str, Any], keys: Sequence[str], run_seed: int) -> None:
    """Keep only the weights that train, and the seed the run's draws derive from (random_draws.py)."""
    checkpoint["run_seed"] = run_seed
    keep_only(checkpoint, keys)


def load_trained_only(
    checkpoint: dict[str, Any], keys: Sequence[str], rebuilt: Mapping[str, Any], run_seed: int, *, fitting: bool
) -> int:
    """Check a checkpoint before Lightning loads it and complete it from the rebuilt module; returns
    the run seed to draw with: a resumed fit continues the checkpoint's draws (else `run_seed`); a
    test or validation of a checkpoint draws from `run_seed`, the seed given now, so that
    --seed_everything repeats an evaluation on fresh samples."""
    check_holds(checkpoint, keys)
    fill_left_out(checkpoint, rebuilt)
    check_grouped(checkpoint.get("hyper_parameters", {}))
    return checkpoint.get("run_seed", run_seed) if fitting else run_seed
