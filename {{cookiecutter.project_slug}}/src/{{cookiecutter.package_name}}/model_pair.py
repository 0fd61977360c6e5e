"""The policy and its frozen reference: loading, response logits, and the per-token statistics.

With LoRA and no reference named, the reference is the policy's base model with the adapter
switched off, so one network is in memory. Checkpoints hold only what trains (`trained_names`):
the reference and the reward are rebuilt from the config.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from .estimators import masked_token_stats
from .models import build_policy, check_same_vocabulary, freeze, load_causal_lm, load_tokenizer, trained_weight_names
from .options import LoRA
from .sampling import Samples, position_ids
from .token_stats import TokenStats


class ModelPair:
    """Policy p and reference q (None: the policy with its LoRA adapter off) over one tokenizer."""

    def __init__(
        self, policy: nn.Module, reference: nn.Module | None, tokenizer: PreTrainedTokenizerBase, lora: bool = False
    ):
        check_same_vocabulary(policy, reference or policy, tokenizer)
        self.policy, self.reference, self.tokenizer, self.lora = policy, reference, tokenizer, lora

    @classmethod
    def load(
        cls,
        policy: str,
        reference: str | None = None,
        tokenizer: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        lora: LoRA | None = None,
    ) -> ModelPair:
        """Hub names, local folders or builtin:tiny-gpt2; reference and tokenizer default to the policy."""
        loaded_tokenizer = load_tokenizer(tokenizer or policy, trust_remote_code)
        model = build_policy(policy, dtype, trust_remote_code, lora)
        shared = lora is not None and reference is None
        frozen = None if shared else freeze(load_causal_lm(reference or policy, dtype, trust_remote_code))
        return cls(model, frozen, loaded_tokenizer, lora is not None)

    @property
    def stop_ids(self) -> list[int]:
        """A response ends at the tokenizer's EOS or any stop id of the model (instruct models list several)."""
        model_stops = self.policy.generation_config.eos_token_id
        model_stops = [model_stops] if isinstance(model_stops, int) else list(model_stops or [])
        return sorted({self.tokenizer.eos_token_id, *model_stops})

    def context_length(self) -> int | None:
        config = self.policy.config
        for key in ("n_positions", "max_position_embeddings"):
            if isinstance(getattr(config, key, None), int):
                return getattr(config, key)
        return None

    def eval(self) -> None:
        """Sampling and the training forward must see the same distribution: no model is ever in training mode."""
        for model in (self.policy, self.reference):
            if model is not None:
                model.eval()

    def trained_names(self) -> list[str]:
        """The policy's state-dict keys a checkpoint holds: all of them, or with LoRA only the adapter's."""
        return trained_weight_names(self.policy, self.lora)

    def response_logits(self, model: nn.Module, samples: Samples) -> Tensor:
        """[N, R, V] logits at the positions that produced each response token."""
        prompt_len, response_len = samples.prompt_ids.shape[1], samples.response.shape[1]
        attention = samples.attention_mask
        out = model(
            input_ids=samples.input_ids,
            attention_mask=attention.long(),
            position_ids=position_ids(attention),  # as generate computed them (docs/estimators.md §6.3)
            # Only the response positions go through the LM head: no [B, prompt, V] logits.
            logits_to_keep=torch.arange(prompt_len - 1, prompt_len + response_len - 1, device=attention.device),
            use_cache=False,
        )
        return out.logits

    @torch.no_grad()
    def reference_logits(self, samples: Samples) -> Tensor:
        if self.reference is not None:
            return self.response_logits(self.reference, samples)
        with self.policy.disable_adapter():  # LoRA: the base model is the reference
            return self.response_logits(self.policy, samples)

    def token_stats(self, samples: Samples, kl_grad: bool, chunk_rows: int | None = None) -> TokenStats:
        """Per-token log-probs, exact KL and entropy [N, R] of the responses, zero on padding."""
        policy_logits = self.response_logits(self.policy, samples)
        ref_logits = self.reference_logits(samples)
        return masked_token_stats(
            policy_logits,
            ref_logits,
            samples.response,
            samples.response_mask,
            kl_grad=kl_grad,
            chunk_rows=chunk_rows,
            inplace=True,  # both logits are ours alone: the op reuses their memory
        )
