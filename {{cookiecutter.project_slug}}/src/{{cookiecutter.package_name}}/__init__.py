"""{{ cookiecutter.description | docstring }}"""

# Layers, each importing only from those above it in this list:
#
#     kl/        the paper's mathematics in pure torch (no Lightning, no transformers)
#     models/    the Hugging Face side: loading, vocabulary, LM head, policy/reference pair, sampler
#     training/  the LightningModule and what it composes: rollout, updater, options, rewards, data, metrics
#     runs/      the CLI, run folders and last-checkpoint logic, export
#     reports/   plots, the KL report, compare-runs, sweeps
#
# The public API: the kl layer's names, and the training layer's imported on first use, so that
# `import {{ cookiecutter.package_name }}.kl` loads neither Lightning nor transformers.

from __future__ import annotations

import importlib
from typing import Any

from . import kl

# Where the Lightning-side names live; imported on first use.
_LAZY = {
    "RBKLModule": "training.module",
    "StepOutput": "training.module",
    "Rollout": "training.rollout",
    "Reward": "training.rewards",
    "PromptDataModule": "training.data",
}
__all__ = [*kl.__all__, *_LAZY]


def __getattr__(name: str) -> Any:
    if name in kl.__all__:
        return getattr(kl, name)
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
