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
    if isinstance(targets, list | tuple):
        # peft refuses a list that matches nothing but takes one that matches in part: an adapter on
        # fewer layers than asked, and a typo that trains silently.
        names = [name for name, _ in model.named_modules()]
        missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
        if missing:
            if len(missing) == len(targets):
                which, partial = f"{list(targets)!r} match", ""
            else:
                verb = "matches" if len(missing) == 1 else "match"
                which = f"{list(targets)!r}: {', '.join(map(repr, missing))} {verb}"
                partial = " (peft would adapt the others alone)"
            raise ValueError(
                f"lora target_modules {which} no layer of the policy{partial}; its linear layers are named "
                f"{', '.join(linear_layer_names(model))}"
            )
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
        raise ValueError(
            f"lora target_modules {targets!r} match no layer of the policy; its linear layers are named "
            f"{', '.join(linear_layer_names(model))}"
        ) from None


def linear_layer_names(model: nn.Module) -> list[str]:
    """The last parts of the names of the model's linear layers (GPT-2's are transformers' Conv1D)."""
    linear = (m for m in model.named_modules() if isinstance(m[1], nn.Linear) or type(m[1]).__name__ == "Conv1D")
    return sorted({name.rpartition(".")[2] for name, _ in linear})
