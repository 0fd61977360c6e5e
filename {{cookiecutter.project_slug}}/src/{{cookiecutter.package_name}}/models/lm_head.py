"""A causal LM as backbone + linear head, for `fused_head.fused_token_stats`.

The fused op needs the final hidden states (the backbone's output, final norm included) and the
output embedding's weight and bias; Gemma-2 also soft-caps its logits. A LoRA adapter on the LM
head contributes its delta to the weight while it is on. A model whose logits are anything else
(a scale after the head, a second projection) is refused by `check_linear_head`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .loading import unwrap_peft


class Head(NamedTuple):
    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V]
    softcap: float | None


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under the LM head (GPT2Model, LlamaModel, ...), adapters still injected."""
    return unwrap_peft(model).base_model


def output_head(model: nn.Module) -> Head:
    """The LM head as the model applies it now: with a LoRA adapter on it, base + delta unless disabled."""
    inner = unwrap_peft(model)
    layer = inner.get_output_embeddings()
    base = getattr(layer, "base_layer", layer)  # a peft LoRA layer wraps the original
    weight = base.weight
    if base is not layer and not layer.disable_adapters and not layer.merged:
        for name in layer.active_adapters:
            if name in layer.lora_A:
                weight = weight + layer.get_delta_weight(name)
    return Head(weight, getattr(base, "bias", None), getattr(inner.config, "final_logit_softcapping", None))


@torch.no_grad()
def check_linear_head(model: nn.Module) -> None:
    """Refuses a model whose logits are not its head applied to its backbone's last hidden state."""
    inner = unwrap_peft(model)
    param = next(inner.parameters())
    with torch.autocast(param.device.type, enabled=False):  # the check compares the heads, not autocast
        _compare_head(model, inner, param)


def _compare_head(model: nn.Module, inner: nn.Module, param: Tensor) -> None:
    ids = torch.arange(1, 5, device=param.device).remainder(inner.config.vocab_size).reshape(1, 4)
    logits = inner(input_ids=ids, use_cache=False).logits.float()
    hidden = backbone(model)(input_ids=ids, use_cache=False).last_hidden_state
    head = output_head(model)
    x = torch.nn.functional.linear(hidden, head.weight, head.bias).float()
    if head.softcap is not None:
        x = head.softcap * torch.tanh(x / head.softcap)
    tolerance = (1e-4 if param.dtype == torch.float32 else 3e-2) * max(1.0, float(logits.abs().max()))
    if not torch.allclose(x, logits, rtol=0, atol=tolerance):
        raise ValueError(
            f"fused_lm_head: the logits of model type {inner.config.model_type!r} are not a linear map of its last "
            "hidden state (it transforms them after the LM head); set model.init_args.updates.fused_lm_head: false"
        )
