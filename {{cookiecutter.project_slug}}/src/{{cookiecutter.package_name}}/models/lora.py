"""A peft LoRA adapter on the policy: its settings and how it is applied."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LoRA:
    """A peft LoRA adapter: only the adapter trains, and with no reference named the reference is
    the policy with its adapter off (one model in memory).

    Args:
        r: rank of the adapter.
        alpha: scale numerator (None: 2 r).
        target_modules: names of the layers to adapt, or a peft keyword such as "all-linear" (None:
            peft's choice for the architecture).
        dropout: must be 0: dropout would make the training forward disagree with the sampling one.
    """

    r: int = 8
    alpha: float | None = None
    target_modules: list[str] | str | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora r must be >= 1, got {self.r}")
        if self.dropout != 0:
            # docs/estimators.md §6.2
            raise ValueError(
                f"lora dropout must be 0: the KL estimators need the sampling distribution, got {self.dropout}"
            )


def apply_lora(model: nn.Module, settings: LoRA) -> nn.Module:
    """Wrap `model` in a peft LoRA adapter: only the adapter trains; the adapter off is the base model."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules
    config = LoraConfig(
        r=settings.r,
        lora_alpha=2 * settings.r if settings.alpha is None else settings.alpha,
        target_modules=list(targets) if isinstance(targets, list | tuple) else targets,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # GPT-2's Conv1D layers: peft switches fan_in_fan_out on itself and says so; and a
            # transformers deprecation that peft, not the user, has to act on.
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            # An adapter on a tied LM head adapts the output only; export.py unties before merging.
            warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*ensure_weight_tying")
            return get_peft_model(model, config)
    except ValueError as error:
        if "target_modules" not in str(error) and "Target modules" not in str(error):
            raise
        layers = sorted({name.rpartition(".")[2] for name, m in model.named_modules() if _adaptable(m)})
        raise ValueError(
            f"lora target_modules {targets!r} match no layer of the policy; its linear layers are named "
            f"{', '.join(layers)}"
        ) from None


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | nn.Embedding) or type(module).__name__ == "Conv1D"
