"""{{ cookiecutter.description | docstring }}"""

# Layers, each importing only from those above it in this list:
#
#     kl/        the paper's mathematics in pure torch (no Lightning, no transformers)
#     models/    the Hugging Face side: loading, vocabulary, LM head, policy/reference pair, sampler
#     training/  the LightningModule and what it composes: rollout, updater, options, rewards, data, metrics
#     runs/      the CLI, run folders and last-checkpoint logic, export
#     reports/   plots, the KL report, compare-runs, sweeps
#
# The public API below is imported on first use, so `import {{ cookiecutter.package_name }}.kl` loads neither
# Lightning nor transformers.

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "GRADIENT_ESTIMATORS": "kl",
    "VALUE_ESTIMATORS": "kl",
    "TokenStats": "kl",
    "fused_token_stats": "kl",
    "kl_grad_surrogate": "kl",
    "sequence_kl": "kl",
    "token_stats": "kl",
    "Objective": "kl",
    "LossParts": "kl",
    "rloo_kl_loss": "kl",
    "RBKLModule": "training.module",
    "Rollout": "training.rollout",
    "StepOutput": "training.module",
    "Reward": "training.rewards",
    "PromptDataModule": "training.data",
}
__all__ = [
    "GRADIENT_ESTIMATORS",
    "VALUE_ESTIMATORS",
    "LossParts",
    "Objective",
    "PromptDataModule",
    "RBKLModule",
    "Reward",
    "Rollout",
    "StepOutput",
    "TokenStats",
    "fused_token_stats",
    "kl_grad_surrogate",
    "rloo_kl_loss",
    "sequence_kl",
    "token_stats",
]

if TYPE_CHECKING:
    from .kl import (
        GRADIENT_ESTIMATORS,
        VALUE_ESTIMATORS,
        LossParts,
        Objective,
        TokenStats,
        fused_token_stats,
        kl_grad_surrogate,
        rloo_kl_loss,
        sequence_kl,
        token_stats,
    )
    from .training.data import PromptDataModule
    from .training.module import RBKLModule, StepOutput
    from .training.rewards import Reward
    from .training.rollout import Rollout


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
