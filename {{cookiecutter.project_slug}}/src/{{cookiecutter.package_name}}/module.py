"""The LightningModule: KL-regularised RLOO fine-tuning of a policy against a frozen reference.

One training batch (docs/estimators.md §4-8):
    rollout:     prompts -> k samples each from the policy (sampling exactly from p)
                         -> rewards on the decoded text                       (once per batch)
    model_step:  policy (with grad) and reference (no grad) logits on prompt + response
                 -> per-token statistics (one fused pass) -> the loss (objective.py), and every
                 KL estimator on the same samples                      (at the current weights)
    update:      backward (in `micro_batches` pieces) and one optimizer step; ppo_epochs x
                 minibatches updates per batch, each on whole prompt groups
    then the statistics of each estimator, grouped by prompt (metrics.EstimatorStudy), always
    at the weights that sampled.

The module steps its optimizer itself (manual optimization), so "step" means one optimizer
step everywhere: schedules, logging, checkpoints and `trainer.max_steps`.

Validation and `test` (the KL evaluation) run the same two parts without the loss.
Subclass it for new tasks: override `score` (rewards), `encode_prompts` (prompt formatting) or
`compute_loss` (the objective); pass model names, not modules, so LightningCLI can build it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from .estimators import LOGGED_ESTIMATORS, all_kl_values, masked_token_stats
from .metrics import STAGES, EstimatorStudy, kl_key, reward_key
from .models import (
    build_policy,
    check_same_vocabulary,
    freeze,
    load_causal_lm,
    load_tokenizer,
    trained_weight_names,
)
from .objective import LossParts, Objective, rloo_kl_loss
from .rewards import Reward, check_rewards
from .sampling import Samples, position_ids, sample_fast, sample_responses, sampling_config, static_cache
from .schedules import lr_lambda
from .token_stats import TokenStats

TOKEN_FIELDS = [f.name for f in dataclasses.fields(TokenStats)]


@dataclass
class Rollout:
    """Sampled and scored once per batch: nothing here depends on the weights after sampling."""

    prompts: list[str]  # n distinct prompts
    samples: Samples  # n * group_size responses, the group_size samples of a prompt adjacent
    rewards: Tensor  # [n * group_size]
    group_size: int
    responses: list[str] | None = None  # the decoded texts the rewards were computed on

    def rows(self, prompts: Tensor) -> Tensor:
        """Sample rows of the prompts at indices `prompts`: their whole groups, on the rewards' device."""
        k = self.group_size
        return (prompts[:, None] * k + torch.arange(k, device=prompts.device)).flatten().to(self.rewards.device)

    def select(self, prompts: Tensor) -> Rollout:
        """The whole groups of the prompts at indices `prompts` (a minibatch never splits a group)."""
        rows = self.rows(prompts)
        responses = None if self.responses is None else [self.responses[i] for i in rows.tolist()]
        prompt_texts = [self.prompts[i] for i in prompts.tolist()]
        return Rollout(prompt_texts, self.samples.select(rows), self.rewards[rows], self.group_size, responses)


@dataclass
class StepOutput:
    stats: TokenStats  # per-token statistics at the current weights
    values: dict[str, Tensor]  # every logged KL estimator per sample, detached, [N] each
    loss: LossParts | None  # None when the step computes no loss (validation)


class RBKLModule(L.LightningModule):
    def __init__(
        self,
        policy: str = "builtin:tiny-gpt2",
        reference: str | None = None,
        tokenizer: str | None = None,
        reward: Reward | None = None,
        kl_gradient: Literal["rb", "mc"] = "rb",
        beta: float = 0.05,
        samples_per_prompt: int = 2,
        max_new_tokens: int = 16,
        val_samples_per_prompt: int = 8,
        test_samples_per_prompt: int = 16,
        lr: float = 3e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_decay: Literal["constant", "linear", "cosine"] = "constant",
        dtype: Literal["float32", "bfloat16"] = "float32",
        trust_remote_code: bool = False,
        generation_kwargs: dict[str, Any] | None = None,
        sampler: Literal["fast", "hf"] = "fast",
        decode_cache: Literal["dynamic", "static"] = "dynamic",
        compile_decode: bool = False,
        kl_chunk_rows: int | None = None,
        kl_placement: Literal["loss", "reward"] = "loss",
        reward_kl_estimator: Literal["mc", "k3", "cv", "rb"] = "rb",
        detach_reward_kl: bool = False,
        advantage: Literal["rloo", "grpo"] = "rloo",
        ppo_epochs: int = 1,
        minibatches: int = 1,
        clip_range: float | None = None,
        micro_batches: int = 1,
        gradient_clip_val: float | None = None,
        lora: dict[str, Any] | None = None,
        chat_template: bool = False,
    ):
        """
        Args:
            policy: the model to fine-tune: hub name, local folder, or builtin:tiny-gpt2[:seed=N].
            reference: the frozen model of the KL term (the teacher, for distillation); default: policy.
            tokenizer: tokenizer name or folder; default: policy.
            reward: callable (prompts, responses) -> Tensor[N], set by class_path; None: no reward (pure KL).
            kl_gradient: estimator of grad KL when kl_placement is "loss": "rb" (Rao-Blackwellized) or
                "mc" (score function).
            beta: KL coefficient.
            samples_per_prompt: k responses per prompt for the leave-one-out baseline (>= 2).
            max_new_tokens: length limit of a response; longer ones are truncated (and count as such).
            val_samples_per_prompt: M responses per validation prompt for the estimator study (>= 2).
            test_samples_per_prompt: M responses per prompt in `train.py test`, the KL evaluation (>= 2).
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: linear warmup from 0 to lr over this many optimizer steps.
            lr_decay: after warmup: "constant", or "linear"/"cosine" decay to 0 at the last step.
            dtype: weights of policy and reference: "float32" or "bfloat16".
            trust_remote_code: allow code shipped with a checkpoint to run (off unless you trust it).
            generation_kwargs: extra generate settings; any that would change the sampled distribution is refused.
            sampler: "fast" (a KV-cache decode loop with exact inverse-CDF sampling) or "hf" (Hugging
                Face generate, for architectures whose cache the loop cannot drive).
            decode_cache: the fast sampler's KV cache: "dynamic" (grows per token) or "static"
                (preallocated; fixed shapes, which compile_decode needs).
            compile_decode: run the fast sampler's decode steps through torch.compile (CUDA graphs
                on a GPU); needs decode_cache "static". The first batches pay the compilation.
            kl_chunk_rows: positions per chunk in the fused full-vocabulary KL op (None: automatic).
            kl_placement: "loss" (the KL gradient estimator beside the reward term) or "reward"
                (R - beta * kl per sample before the baseline, as TRL and the paper's code).
            reward_kl_estimator: kl in the reward: "mc", "k3", "cv" (alpha = 1) or "rb".
            detach_reward_kl: drop kl's own (pathwise) gradient; then only "mc" stays unbiased.
            advantage: "rloo" (leave-one-out baseline) or "grpo" (group mean and std; the std
                scaling changes the objective).
            ppo_epochs: passes over each sampled batch (>= 1); later passes are importance-weighted.
            minibatches: optimizer steps per pass, each on whole prompt groups (must divide the batch).
            clip_range: PPO clipping of the sequence ratio in the advantage term (None: no clipping).
            micro_batches: gradient accumulation: each minibatch's forward and backward in this many
                pieces of whole prompt groups (less memory, same update). Replaces the trainer's
                accumulate_grad_batches.
            gradient_clip_val: clip the gradient norm before each optimizer step (None: no clipping).
                Replaces the trainer's gradient_clip_val.
            lora: train a LoRA adapter: {r, alpha, target_modules} (peft; dropout must be 0). With no
                separate reference, the reference is the policy with its adapter off: one model in memory.
            chat_template: format each prompt as a user message with the tokenizer's chat template.
        """
        super().__init__()
        if samples_per_prompt < 2:
            raise ValueError(
                f"samples_per_prompt must be >= 2 for the leave-one-out baseline, got {samples_per_prompt}"
            )
        for name, m in (
            ("val_samples_per_prompt", val_samples_per_prompt),
            ("test_samples_per_prompt", test_samples_per_prompt),
        ):
            if m < 2:
                raise ValueError(f"{name} must be >= 2 to estimate a variance over a prompt's samples, got {m}")
        if compile_decode and decode_cache != "static":
            raise ValueError("compile_decode needs decode_cache: static (a growing cache would recompile every token)")
        if sampler == "hf" and (decode_cache != "dynamic" or compile_decode):
            raise ValueError("decode_cache and compile_decode set the fast sampler; sampler hf uses generate's own")
        for name, count in (("ppo_epochs", ppo_epochs), ("minibatches", minibatches), ("micro_batches", micro_batches)):
            if count < 1:
                raise ValueError(f"{name} must be >= 1, got {count}")
        if gradient_clip_val is not None and not gradient_clip_val > 0:
            raise ValueError(f"gradient_clip_val must be > 0 (or None for no clipping), got {gradient_clip_val}")
        self.objective = Objective(
            beta, kl_gradient, kl_placement, reward_kl_estimator, detach_reward_kl, advantage, clip_range
        )
        self.save_hyperparameters(ignore=["reward"])
        # Several optimizer steps per batch: the module steps the optimizer itself.
        self.automatic_optimization = False
        self.tokenizer = load_tokenizer(tokenizer or policy, trust_remote_code)
        if chat_template and not self.tokenizer.chat_template:
            raise ValueError(f"chat_template is set but the tokenizer of {tokenizer or policy!r} has no chat template")
        self.policy = build_policy(policy, dtype, trust_remote_code, lora)
        # With LoRA and no reference named, the reference is the policy with its adapter off.
        shared = lora is not None and reference is None
        self.reference = None if shared else freeze(load_causal_lm(reference or policy, dtype, trust_remote_code))
        check_same_vocabulary(self.policy, self.reference or self.policy, self.tokenizer)
        self.reward = freeze(reward) if isinstance(reward, nn.Module) else reward
        self.train()  # every model in eval mode from the start, not only after Lightning's first switch
        # A response ends at the tokenizer's EOS or any stop id of the model (instruct models list several).
        model_stops = self.policy.generation_config.eos_token_id
        model_stops = [model_stops] if isinstance(model_stops, int) else list(model_stops or [])
        self.stop_ids = sorted({self.tokenizer.eos_token_id, *model_stops})
        self.generation_config = sampling_config(
            max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            **(generation_kwargs or {}),
        )
        if sampler == "fast" and getattr(self.policy.config, "is_encoder_decoder", False):
            raise ValueError("sampler 'fast' drives decoder-only models; use sampler: hf for an encoder-decoder")
        # Keyed "<stage>_study": a ModuleDict key may not shadow a Module attribute such as train.
        self.studies = nn.ModuleDict({f"{stage}_study": EstimatorStudy(stage, LOGGED_ESTIMATORS) for stage in STAGES})
        # Checkpoints hold the policy only: the reference and reward are rebuilt from the config.
        self.strict_loading = False
        self._rng_states_to_restore: dict[str, Any] | None = None  # set by on_load_checkpoint
        self._static_cache: tuple[tuple, Any] | None = None  # decode_cache "static": reused across batches
        self._compiled_decode = None

    # -- modes ---------------------------------------------------------------------------------

    @property
    def updates_per_batch(self) -> int:
        return self.hparams.ppo_epochs * self.hparams.minibatches

    def train(self, mode: bool = True):
        # Sampling and the training forward must see the same distribution, so every model
        # stays in eval mode (dropout is also set to 0 on load). Lightning 2.6 does not call
        # this during fit (it only restores modes around validation): __init__ calls it.
        super().train(mode)
        for model in (self.policy, self.reference, self.reward):
            if isinstance(model, nn.Module):
                model.eval()
        return self

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Loading is not strict (the reference is left out on purpose), so a checkpoint that lacks
        # policy weights would otherwise load silently and train from the initial weights.
        missing = [k for k in self.checkpointed_keys() if k not in checkpoint["state_dict"]]
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} of the policy's weights (e.g. {missing[0]!r}): it was not "
                "written for this policy"
            )
        self._rng_states_to_restore = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch: list[str], batch_idx: int) -> None:
        # Restored here, not at load: Lightning draws random numbers between loading and training.
        states, self._rng_states_to_restore = self._rng_states_to_restore, None
        # Ranks draw from different streams (on_fit_start); the checkpoint holds rank 0's only.
        if states is not None and self.trainer.world_size == 1:
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The sampling randomness at this step, restored at the first resumed batch: with the
        # data order (data.EpochShuffle) it makes a resumed CPU run repeat the uninterrupted one.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()
        state, kept = checkpoint["state_dict"], set(self.checkpointed_keys())
        for key in [k for k in state if k not in kept]:
            del state[key]

    def checkpointed_keys(self) -> list[str]:
        """The state-dict keys a checkpoint holds: the policy's (with LoRA, only the adapter's)."""
        return [f"policy.{name}" for name in trained_weight_names(self.policy, self.hparams.lora is not None)]

    # -- data flow -----------------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids [B, P] and mask [B, P] bool; refuses prompts that cannot fit."""
        if self.hparams.chat_template:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
            # The template writes its own special tokens; the tokenizer must not add more.
            enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        else:
            enc = self.tokenizer(list(prompts), padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device).bool()
        lengths = mask.sum(1)  # [B]
        if (lengths == 0).any():
            raise ValueError("empty prompt: every prompt needs at least one token")
        limit = self.context_length()
        if limit is not None and ids.shape[1] + self.hparams.max_new_tokens > limit:
            longest = prompts[int(lengths.argmax())]
            raise ValueError(
                f"prompt of {int(lengths.max())} tokens + max_new_tokens={self.hparams.max_new_tokens} exceeds "
                f"the model's context of {limit} tokens: {longest[:80]!r}"
            )
        return ids, mask

    def setup(self, stage: str) -> None:
        # Every prompt checked before the first step, not when its batch comes up.
        data = self.trainer.datamodule
        names = {"fit": ("train_prompts", "val_prompts"), "validate": ("val_prompts",), "test": ("test_prompts",)}
        prompts = [p for name in names.get(stage, ()) for p in getattr(data, name, [])]
        if stage == "fit":
            self.check_batch_split(getattr(data, "hparams", {}).get("batch_size"))
        for start in range(0, len(prompts), 256):
            self.encode_prompts(prompts[start : start + 256])
        self.warn_unknown_words(prompts)

    def check_batch_split(self, batch_size: int | None) -> None:
        """Minibatches and micro-batches are whole prompt groups: they must divide the batch."""
        h = self.hparams
        if batch_size is None:
            return
        if batch_size % h.minibatches:
            raise ValueError(
                f"minibatches={h.minibatches} does not divide a batch of {batch_size} prompts into whole prompt "
                "groups: choose a divisor of data.batch_size"
            )
        if (batch_size // h.minibatches) % h.micro_batches:
            raise ValueError(
                f"micro_batches={h.micro_batches} does not divide a minibatch of {batch_size // h.minibatches} "
                "prompts into whole prompt groups"
            )

    @staticmethod
    def check_trainer(trainer: L.Trainer) -> None:
        """Lightning's own accumulation and clipping do not apply to a module that steps itself."""
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "trainer.accumulate_grad_batches is not used by this module, which steps its optimizer itself: "
                "set model.init_args.micro_batches (gradient accumulation over whole prompt groups) instead"
            )
        if trainer.gradient_clip_val is not None:
            raise ValueError(
                "trainer.gradient_clip_val is not used by this module, which steps its optimizer itself: set "
                "model.init_args.gradient_clip_val instead"
            )

    def warn_unknown_words(self, prompts: Sequence[str]) -> None:
        """One warning listing the words the tokenizer can only read as its unknown token."""
        unk = self.tokenizer.unk_token_id
        if unk is None or unk == self.tokenizer.eos_token_id:  # byte-level BPE has no unknown words
            return
        words = sorted({w for p in prompts for w in p.split() if unk in self.tokenizer(w)["input_ids"]})
        if words:
            shown = ", ".join(repr(w) for w in words[:12]) + (", ..." if len(words) > 12 else "")
            warnings.warn(
                f"{len(words)} word(s) of the prompts are not in the tokenizer's vocabulary and read as "
                f"{self.tokenizer.unk_token}: {shown}",
                UserWarning,
                stacklevel=2,
            )

    def context_length(self) -> int | None:
        config = self.policy.config
        for key in ("n_positions", "max_position_embeddings"):
            if isinstance(getattr(config, key, None), int):
                return getattr(config, key)
        return None

    def sample(self, prompts: Sequence[str], k: int) -> Samples:
        ids, mask = self.encode_prompts(prompts)
        # Sharded weights are gathered layer by layer in every forward: ranks that finish early
        # must keep stepping until all are done, or the others wait forever.
        synced = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)
        if self.hparams.sampler == "hf":
            return sample_responses(self.policy, ids, mask, k, self.generation_config, synced_gpus=synced)
        h = self.hparams
        cache = (
            self.static_cache(ids.shape[0] * k, ids.shape[1] + h.max_new_tokens) if h.decode_cache == "static" else None
        )
        return sample_fast(
            self.policy,
            ids,
            mask,
            k,
            h.max_new_tokens,
            self.stop_ids,
            self.tokenizer.pad_token_id,
            synced_gpus=synced,
            cache=cache,
            decode=self.compiled_decode() if h.compile_decode else None,
        )

    def static_cache(self, rows: int, length: int):
        """An empty static KV cache, the previous batch's reset when the shapes agree: the same
        tensors batch after batch, as CUDA graphs want them."""
        key = (rows, length, self.device)
        if self._static_cache is not None and self._static_cache[0] == key:
            self._static_cache[1].reset()
        else:
            self._static_cache = (key, static_cache(self.policy, length))
        return self._static_cache[1]

    def compiled_decode(self):
        """The policy's forward compiled once for decode steps (fixed shapes with a static cache)."""
        if self._compiled_decode is None:
            # CUDA graphs remove the per-token launch overhead that dominates small-model decoding.
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._compiled_decode = torch.compile(self.policy.forward, mode=mode, dynamic=False)
        return self._compiled_decode

    def decode_responses(self, samples: Samples) -> list[str]:
        # Only the tokens under the mask, without the EOS: text as a reader would see it.
        response = samples.response.masked_fill(~samples.response_mask, self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(response, skip_special_tokens=True)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        """Rewards [N] for repeated prompts and their responses (zeros without a reward)."""
        if self.reward is None:
            return torch.zeros(len(responses), device=self.device)
        return check_rewards(self.reward(prompts, responses), prompts, responses).to(self.device)

    def response_logits(self, model: nn.Module, samples: Samples) -> Tensor:
        """[N, R, V] logits at the positions that produced each response token."""
        prompt_len, response_len = samples.prompt_ids.shape[1], samples.response.shape[1]
        attention = samples.attention_mask
        out = model(
            input_ids=samples.input_ids,
            attention_mask=attention.long(),
            position_ids=position_ids(attention),  # as generate computed them (docs/estimators.md §6.3)
            # Only the response positions go through the LM head: no [B, prompt, V] logits.
            logits_to_keep=torch.arange(prompt_len - 1, prompt_len + response_len - 1, device=self.device),
            use_cache=False,
        )
        return out.logits

    def rollout(self, prompts: Sequence[str], k: int) -> Rollout:
        """Sample k responses per prompt and score them: once per batch, whatever the updates."""
        samples = self.sample(prompts, k)
        repeated = [p for p in prompts for _ in range(k)]
        responses = self.decode_responses(samples)
        return Rollout(list(prompts), samples, self.score(repeated, responses), k, responses)

    @torch.no_grad()
    def reference_logits(self, samples: Samples) -> Tensor:
        if self.reference is not None:
            return self.response_logits(self.reference, samples)
        with self.policy.disable_adapter():  # LoRA: the base model is the reference
            return self.response_logits(self.policy, samples)

    def token_stats(self, samples: Samples, kl_grad: bool) -> TokenStats:
        policy_logits = self.response_logits(self.policy, samples)
        ref_logits = self.reference_logits(samples)
        return masked_token_stats(
            policy_logits,
            ref_logits,
            samples.response,
            samples.response_mask,
            kl_grad=kl_grad,
            chunk_rows=self.hparams.kl_chunk_rows,
            inplace=True,  # both logits are ours alone: the op reuses their memory
        )

    def compute_loss(
        self, stats: TokenStats, rollout: Rollout, objective: Objective, old_logp: Tensor | None = None
    ) -> LossParts:
        mask = rollout.samples.response_mask
        return rloo_kl_loss(stats, mask, rollout.rewards, rollout.group_size, objective, old_logp)

    def model_step(
        self,
        rollout: Rollout,
        *,
        with_loss: bool = True,
        kl_gradient: str | None = None,
        old_logp: Tensor | None = None,
    ) -> StepOutput:
        """What depends on the current weights: log-probs, KL statistics, every estimate, the loss.

        Shared by training, validation and benchmarks/step.py. `kl_gradient` overrides the
        configured estimator for this call only (the benchmark compares both on one module);
        `old_logp` [N] are the sampling policy's log-probabilities once the weights have moved.
        """
        objective = self.objective
        if kl_gradient is not None:
            objective = dataclasses.replace(objective, kl_gradient=kl_gradient)
        stats = self.token_stats(rollout.samples, kl_grad=with_loss and objective.needs_kl_grad)
        loss = self.compute_loss(stats, rollout, objective, old_logp) if with_loss else None
        return StepOutput(stats, all_kl_values(stats, rollout.samples.response_mask, rollout.group_size), loss)

    # -- steps ---------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        # Every rank was seeded alike; without an offset, ranks would draw correlated samples.
        if self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.global_rank)

    def training_step(self, batch: list[str], batch_idx: int) -> dict[str, Tensor]:
        rollout = self.rollout(batch, self.hparams.samples_per_prompt)
        first_step, mask = self.global_step, rollout.samples.response_mask
        lr = self.optimizers().param_groups[0]["lr"]  # of the batch's first update
        if self.updates_per_batch == 1:
            # The one update runs at the sampling weights: its statistics are the batch's (rho = 1).
            outputs = self.update(rollout, torch.arange(len(rollout.prompts)), None)
            sampled = outputs[0]
            if len(outputs) > 1:  # micro-batches: the pieces' statistics joined, estimates over the whole batch
                stats = TokenStats(*(torch.cat([getattr(o.stats, f).detach() for o in outputs]) for f in TOKEN_FIELDS))
                sampled = StepOutput(stats, all_kl_values(stats, mask, rollout.group_size), None)
        else:
            # Statistics of the policy that sampled, and its log-probs for the importance ratios.
            with torch.no_grad():
                sampled = self.model_step(rollout, with_loss=False)
            old_logp = sampled.stats.logp.sum(-1)
            schedule = self.minibatch_schedule(len(rollout.prompts))
            outputs = [out for groups in schedule for out in self.update(rollout, groups, old_logp)]

        self.study("train").update(sampled.values, rollout.rewards, rollout.group_size)
        if self.should_log_step(first_step):
            self.log_training(rollout, sampled, outputs, first_step, lr)
        # Callbacks see this rank's per-sample values in on_train_batch_end.
        return {"rewards": rollout.rewards, **{f"kl/{n}": v for n, v in sampled.values.items()}}

    def minibatch_schedule(self, n_prompts: int) -> Iterator[Tensor]:
        """Prompt indices of each update: ppo_epochs passes, each in a new random order of groups."""
        for _ in range(self.hparams.ppo_epochs):
            order = torch.randperm(n_prompts) if self.hparams.minibatches > 1 else torch.arange(n_prompts)
            yield from (part for part in order.tensor_split(self.hparams.minibatches) if len(part))

    def update(self, rollout: Rollout, prompts: Tensor, old_logp: Tensor | None) -> list[StepOutput]:
        """One optimizer step on the groups of `prompts`, backward in `micro_batches` pieces."""
        optimizer, h = self.optimizers(), self.hparams
        outputs, pieces = [], [p for p in prompts.tensor_split(h.micro_batches) if len(p)]
        # Under DDP only the last piece's backward all-reduces; the others accumulate locally.
        block_sync = getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)
        for i, piece in enumerate(pieces):
            with contextlib.nullcontext() if i == len(pieces) - 1 else block_sync():
                part = rollout.select(piece)
                out = self.model_step(part, old_logp=None if old_logp is None else old_logp[rollout.rows(piece)])
                # Each piece weighs by its share of samples: the sum is the minibatch's mean loss.
                self.manual_backward(out.loss.loss * (len(piece) / len(prompts)))
            outputs.append(out)
        if h.gradient_clip_val is not None:
            self.clip_policy_gradients(optimizer, h.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        return outputs

    def clip_policy_gradients(self, optimizer, max_norm: float) -> None:
        if isinstance(self.trainer.strategy, FSDPStrategy):
            # Sharded gradients: only the root FSDP module knows the global norm.
            self.trainer.strategy.model.clip_grad_norm_(max_norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    def log_training(
        self, rollout: Rollout, sampled: StepOutput, outputs: list[StepOutput], step: int, lr: float
    ) -> None:
        mask = rollout.samples.response_mask
        n_tokens = mask.sum().clamp(min=1)
        losses = [out.loss for out in outputs]
        scalars = {
            # Means over the batch's updates (and their micro-batches).
            "train/loss": torch.stack([part.loss.detach() for part in losses]).mean(),
            "train/policy_gradient_loss": torch.stack([part.policy_gradient for part in losses]).mean(),
            # What a reader takes for the penalty: beta x KL, with the RB value of the KL (the
            # surrogate's forward value is not a KL).
            "train/kl_penalty": self.hparams.beta * sampled.values["rb"].mean(),
            "train/entropy": sampled.stats.entropy.detach().sum() / n_tokens,
            "train/response_length": mask.sum(1).float().mean(),
        }
        if self.hparams.clip_range is not None:
            scalars["train/clip_fraction"] = torch.stack([part.clip_fraction for part in losses]).mean()
        # One collective for all scalars: the mean over ranks.
        reduced = self.trainer.strategy.reduce(torch.stack(list(scalars.values())).float(), reduce_op="mean")
        logged = dict(zip(scalars, reduced, strict=True))
        logged["train/global_batch"] = torch.tensor(float(len(rollout.rewards) * self.trainer.world_size))
        logged["train/lr"] = torch.tensor(lr)
        logged.update(self.study("train").compute())
        self.write_to_loggers(logged, step)
        progress = {"reward": logged[reward_key("train", "mean")], "kl_rb": logged[kl_key("train", "rb", "mean")]}
        self.log_dict(progress, prog_bar=True, logger=False)

    def evaluation_step(self, stage: str, batch: list[str], samples_per_prompt: int) -> dict[str, Any]:
        """Validation and test: M samples per prompt, every estimator on the same samples."""
        rollout = self.rollout(batch, samples_per_prompt)
        values = self.model_step(rollout, with_loss=False).values  # Lightning evaluates without grad
        self.study(stage).update(values, rollout.rewards, rollout.group_size)
        # Callbacks (the sample table) see the texts and this rank's per-sample values.
        return {
            "prompts": rollout.prompts,
            "responses": rollout.responses,
            "rewards": rollout.rewards,
            **{f"kl/{n}": v for n, v in values.items()},
        }

    def validation_step(self, batch: list[str], batch_idx: int) -> dict[str, Any]:
        return self.evaluation_step("val", batch, self.hparams.val_samples_per_prompt)

    def test_step(self, batch: list[str], batch_idx: int) -> dict[str, Any]:
        return self.evaluation_step("test", batch, self.hparams.test_samples_per_prompt)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.study("val").compute())

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.study("test").compute())

    # -- logging -------------------------------------------------------------------------------

    def study(self, stage: str) -> EstimatorStudy:
        """The statistics of a stage (train, val, test): updated per step, logged by compute()."""
        return self.studies[f"{stage}_study"]

    def should_log_step(self, first_step: int) -> bool:
        """Whether this batch's updates reached a multiple of log_every_n_steps (alike on every rank)."""
        every = self.trainer.log_every_n_steps
        return self.global_step // every > first_step // every or self.trainer.should_stop

    def write_to_loggers(self, metrics: dict[str, Tensor], step: int) -> None:
        """Per-step metrics straight to the loggers (rank 0 writes).

        They are global already, and self.log costs ~0.3 ms per key and step: with 40+ keys that
        was a third of a small model's training step. Validation metrics still go through
        self.log, since callbacks read them from trainer.callback_metrics.
        """
        values = dict(
            zip(metrics, torch.stack([v.float().to(self.device) for v in metrics.values()]).tolist(), strict=True)
        )  # one device-to-host copy
        values["epoch"] = self.current_epoch
        for logger in self.loggers:
            logger.log_metrics(values, step=step)  # the step at which the batch was sampled

    # -- optimisation --------------------------------------------------------------------------

    def configure_optimizers(self):
        h = self.hparams
        # Only the policy's trainable weights: self.parameters() would include the reference.
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)
        # Lightning estimates batches, capped by max_steps (which counts optimizer steps).
        batches, max_steps = self.trainer.estimated_stepping_batches, self.trainer.max_steps
        total = int(batches) * self.updates_per_batch if batches != float("inf") else None
        if total is not None and max_steps != -1:
            total = min(total, max_steps)
        schedule = lr_lambda(h.warmup_steps, total, h.lr_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
