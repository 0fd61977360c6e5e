"""The policy and its frozen reference: loading, response logits, and the per-token statistics.

With LoRA and no reference named, the reference is the policy's base model with the adapter
switched off, so one network is in memory. Checkpoints hold only what trains (`trained_names`):
the reference and the reward are rebuilt from the config.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ..kl.fused_head import fused_token_stats
from ..kl.token_stats import TokenStats, masked_stats, masked_token_stats
from .lm_head import backbone, check_linear_head, output_head
from .loading import (
    build_policy,
    check_local_folder,
    check_same_tokenizer,
    check_same_vocabulary,
    freeze,
    load_causal_lm,
    load_tokenizer,
    output_vocab_size,
    own_tokenizer,
    trained_weight_names,
)
from .lora import LoRA
from .sampler import Samples, position_ids

# fused_lm_head None: the fused op once one micro-batch's float32 response logits would pass this.
FUSED_HEAD_AUTO_BYTES = 1 << 30


class ModelPair:
    """Policy p and reference q (None: the policy with its LoRA adapter off) over one tokenizer."""

    def __init__(
        self, policy: nn.Module, reference: nn.Module | None, tokenizer: PreTrainedTokenizerBase, lora: bool = False
    ):
        check_same_vocabulary(policy, reference or policy, tokenizer)
        self.policy, self.reference, self.tokenizer, self.lora = policy, reference, tokenizer, lora
        self._linear_heads: bool | None = None  # checked on first need (fuses)

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
        for option, name in {"policy": policy, "reference": reference, "tokenizer": tokenizer}.items():
            if name is not None:
                check_local_folder(name, f"model.init_args.{option}")
        loaded_tokenizer = load_tokenizer(tokenizer or policy, trust_remote_code)
        if reference is not None and reference not in (policy, tokenizer or policy):
            # A reference of its own may come with a tokenizer of its own: its ids must mean the policy's words.
            reference_tokenizer = own_tokenizer(reference, trust_remote_code)
            if reference_tokenizer is not None:
                check_same_tokenizer(loaded_tokenizer, reference_tokenizer, tokenizer or policy, reference)
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

    def check_linear_heads(self) -> None:
        """Refuses a pair whose logits are not their head on the last hidden state (fused_head.py)."""
        for model in (self.policy, self.reference):
            if model is not None:
                check_linear_head(model)

    def fuses(self, fused: bool | None, rows: int, sharded: bool = False) -> bool:
        """The one place the fused-head choice is made (fused_head.py): `fused` as set, or None: on
        when `rows` response positions' float32 logits would pass FUSED_HEAD_AUTO_BYTES and both
        heads are linear. `sharded` (FSDP) holds the head's weight in shards: never fused there."""
        if sharded:
            if fused:
                raise ValueError(
                    "updates.fused_lm_head needs the LM head's whole weight, which FSDP shards: set "
                    "model.init_args.updates.fused_lm_head: false (or leave it unset)"
                )
            return False
        if fused and not self._linear_heads:
            self.check_linear_heads()  # refuses a head the op cannot stand in for
            self._linear_heads = True
        if fused is not None:
            return fused
        if rows * output_vocab_size(self.policy) * 4 <= FUSED_HEAD_AUTO_BYTES:
            return False
        if self._linear_heads is None:
            try:
                self.check_linear_heads()
                self._linear_heads = True
            except ValueError:
                self._linear_heads = False
        return self._linear_heads

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

    @contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The reference as a network to call: its own, or (LoRA) the policy with its adapter off."""
        if self.reference is not None:
            yield self.reference
        else:
            with self.policy.disable_adapter():
                yield self.policy

    def response_outputs(self, model: nn.Module, samples: Samples, hidden: bool = False) -> Tensor:
        """[N, R, V] logits, or `hidden`: [N, R, H] final hidden states, at the positions that
        produced each response token."""
        prompt_len, response_len = samples.prompt_ids.shape[1], samples.response.shape[1]
        attention = samples.attention_mask
        inputs = {
            "input_ids": samples.input_ids,
            "attention_mask": attention.long(),
            "position_ids": position_ids(attention),  # as generate computed them (docs/estimators.md §6.3)
            "use_cache": False,
        }
        if hidden:
            out = backbone(model)(**inputs)
            return out.last_hidden_state[:, prompt_len - 1 : prompt_len + response_len - 1]
        # Only the response positions go through the LM head: no [B, prompt, V] logits.
        keep = torch.arange(prompt_len - 1, prompt_len + response_len - 1, device=attention.device)
        return model(**inputs, logits_to_keep=keep).logits

    def response_logits(self, model: nn.Module, samples: Samples) -> Tensor:
        """[N, R, V] logits at the positions that produced each response token."""
        return self.response_outputs(model, samples)

    @torch.no_grad()
    def reference_logits(self, samples: Samples) -> Tensor:
        with self.reference_model() as reference:
            return self.response_outputs(reference, samples)

    def fused_stats(self, samples: Samples, kl_grad: bool, chunk_rows: int | None) -> TokenStats:
        """token_stats from the hidden states and the LM heads (fused_head.py): no [N, R, V] logits."""
        hidden, head = self.response_outputs(self.policy, samples, hidden=True), output_head(self.policy)
        with torch.no_grad(), self.reference_model() as reference:
            ref_hidden, ref_head = self.response_outputs(reference, samples, hidden=True), output_head(reference)
        return masked_stats(
            lambda tokens: fused_token_stats(
                hidden,
                head.weight,
                ref_hidden,
                ref_head.weight,
                tokens,
                policy_bias=head.bias,
                ref_bias=ref_head.bias,
                kl_grad=kl_grad,
                chunk_rows=chunk_rows,
                softcap=head.softcap,
                ref_softcap=ref_head.softcap,
            ),
            samples.response,
            samples.response_mask,
        )

    def token_stats(
        self,
        samples: Samples,
        kl_grad: bool,
        chunk_rows: int | None = None,
        fused: bool | None = False,
        sharded: bool = False,
    ) -> TokenStats:
        """Per-token log-probs, exact KL and entropy [N, R] of the responses, zero on padding;
        `fused`: from the hidden states and LM heads, never holding [N, R, V] logits (None: `fuses`)."""
        if self.fuses(fused, samples.response.numel(), sharded):
            return self.fused_stats(samples, kl_grad, chunk_rows)
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
