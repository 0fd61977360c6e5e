"""One training step of the offline default, part by part, against what each part must cost.

    python benchmarks/step_profile.py                  # 5 warm-up steps, then 20 timed
    python benchmarks/step_profile.py --steps 40 --threads 1

Runs the offline default (configs/default.yaml: the built-in tiny GPT-2, 8 prompts x 4 samples,
12 new tokens, the VADER reward, the RB gradient, a CSV logger writing every step) through
Lightning, with a timer around each part of the step, and then times the same work as a bare
PyTorch loop on the same model and inputs. Prints one table:

    part | measured ms | limit ms | ratio | floor ms

measured  the part's median over the timed steps (per call for "decode step")
limit     the same work written as a bare loop: the model's forward (prefill, one decode step
          with its KV cache, the training forward at the response positions), the reference's
          forward, log_softmax + gather + the exact KL over the vocabulary, the backward of that
          loss, torch's fused AdamW step on the same weights, the reward on the last batch's texts
floor     arithmetic at this machine's measured rates: the matmuls' FLOPs at the GEMM rate of a
          512 x 512 float32 matmul, the optimizer's bytes (read p, g, m, v; write p, m, v) at
          the bandwidth of a large copy. The statistics and logging have no bare loop: they are
          a few hundred numbers, so their floor (bytes at bandwidth) is ~0 and all of their time
          is overhead.

ratio = measured / limit. "other" is what no timer covers: Lightning's loop around the step, the
learning-rate schedule. A part's ratio near 1 is at its limit; the next target is the part
with the most milliseconds above its limit.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from step import quiet_trainer

import {{ cookiecutter.package_name }}.training.module as module_file
from {{ cookiecutter.package_name }}.kl.objective import Objective
from {{ cookiecutter.package_name }}.models.sampler import position_ids
from {{ cookiecutter.package_name }}.models.vocabulary import TRAIN_PROMPTS
from {{ cookiecutter.package_name }}.training.data import PromptDataModule
from {{ cookiecutter.package_name }}.training.module import RBKLModule
from {{ cookiecutter.package_name }}.training.options import Optimization, Sampling
from {{ cookiecutter.package_name }}.training.rewards import VaderSentimentReward

# configs/default.yaml
PROMPTS, K, NEW_TOKENS, BETA, LR, SEED = 8, 4, 12, 0.05, 3e-4, 0


class Parts:
    """Seconds per part and per step: `timed(label)` adds to the current step's total of a part."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self.phase = "train"
        self.recording = True

    @contextmanager
    def timed(self, label: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            if self.steps and self.recording:
                self.steps[-1][label] = self.steps[-1].get(label, 0.0) + elapsed

    def wrap(self, owner, name: str, label: str, phase: str | None = None) -> None:
        """Replace `owner.name` (an instance's method or a module's function) with a timed call."""
        inner = getattr(owner, name)

        def timed_call(*args, **kwargs):
            before = self.phase
            if phase is not None:
                self.phase = phase
            try:
                with self.timed(label):
                    return inner(*args, **kwargs)
            finally:
                self.phase = before

        setattr(owner, name, timed_call)

    def median(self, label: str, skip: int) -> float:
        return statistics.median(step.get(label, 0.0) for step in self.steps[skip:])


class TimedSampler:
    """The module's sampler with its call (sampling) and its decode to text (scoring) timed."""

    def __init__(self, sampler, parts: Parts):
        self.sampler, self.parts = sampler, parts
        self.decode_steps: list[int] = []

    def __call__(self, *args, **kwargs):
        self.parts.phase, self.parts.forwards = "sampling", 0
        try:
            with self.parts.timed("sampling"):
                samples = self.sampler(*args, **kwargs)
        finally:
            self.parts.phase = "train"
        self.decode_steps.append(samples.response.shape[1] - 1)  # the first token comes from the prefill
        return samples

    def decode(self, samples):
        with self.parts.timed("scoring"):
            return self.sampler.decode(samples)


class StepTimer(L.Callback):
    def __init__(self, parts: Parts):
        self.parts = parts

    def on_train_start(self, trainer, module) -> None:
        optimizer = trainer.optimizers[0]
        self.parts.wrap(optimizer, "step", "optimizer step")
        self.parts.wrap(optimizer, "zero_grad", "optimizer step")

    def on_train_batch_start(self, *args) -> None:
        self.parts.steps.append({})
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.parts.steps[-1]["step"] = time.perf_counter() - self.start


def instrument(module: RBKLModule, parts: Parts) -> TimedSampler:
    """Timers around each part of the module's step (instance attributes: the class is untouched)."""
    sampler = module.sampler = TimedSampler(module.sampler, parts)
    policy_forward = module.policy.forward

    def timed_policy_forward(*args, **kwargs):
        if parts.phase == "sampling":  # the first call of a rollout is the prefill, then one per token
            label = "prefill" if parts.forwards == 0 else "decode forward"
            parts.forwards += 1
        else:
            label = "policy forward"
        with parts.timed(label):
            return policy_forward(*args, **kwargs)

    module.policy.forward = timed_policy_forward
    parts.wrap(module.reference, "forward", "reference forward")
    parts.wrap(module, "encode_prompts", "prompt encoding")
    score = module.score

    def kept_score(prompts, responses):  # the last batch's texts, for the reward's bare limit
        parts.last_texts = (list(prompts), list(responses))
        return score(prompts, responses)

    module.score = kept_score
    parts.wrap(module, "score", "scoring")
    parts.wrap(module.pair, "token_stats", "token stats forward")
    parts.wrap(module, "compute_loss", "loss")
    parts.wrap(module, "manual_backward", "backward")
    parts.wrap(module_file, "all_kl_values", "statistics")
    parts.wrap(module.study("train"), "update", "statistics")
    parts.wrap(module_file, "log_batch", "logging")
    seeded_draws = module_file.seeded_draws

    @contextmanager
    def timed_draws(*args, **kwargs):  # entering and leaving the batch's seeded draws
        draws = seeded_draws(*args, **kwargs)
        with parts.timed("seeded draws"):
            draws.__enter__()
        try:
            yield
        finally:
            with parts.timed("seeded draws"):
                draws.__exit__(None, None, None)

    module_file.seeded_draws = timed_draws
    return sampler


def run_module(steps: int, warmup: int, log_dir: Path) -> tuple[RBKLModule, Parts, TimedSampler]:
    L.seed_everything(SEED)
    module = RBKLModule(
        policy="builtin:tiny-gpt2",
        reward=VaderSentimentReward(),
        objective=Objective(beta=BETA, kl_gradient="rb"),
        sampling=Sampling(samples_per_prompt=K, max_new_tokens=NEW_TOKENS, val_samples_per_prompt=8),
        optimization=Optimization(lr=LR),
    )
    parts = Parts()
    sampler = instrument(module, parts)
    trainer = quiet_trainer(
        max_steps=warmup + steps, logger=CSVLogger(log_dir), log_every_n_steps=1, callbacks=[StepTimer(parts)]
    )
    trainer.fit(module, PromptDataModule(batch_size=PROMPTS, epoch_repeats=100))
    return module, parts, sampler


def best_of(fn, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_rate() -> float:
    """FLOP/s of a 512 x 512 float32 matmul at the current thread count."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    return 2 * 512**3 / best_of(lambda: a @ b, 50)


def copy_bandwidth() -> float:
    """Bytes/s read plus written by a 64 MiB copy."""
    src = torch.randn(16 * 2**20)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_of(lambda: dst.copy_(src), 20)


def matmul_flops(model, rows: int, new_positions: int, context: int, head_positions: int) -> float:
    """Forward matmul FLOPs of a GPT-2: `rows` sequences, `new_positions` each through the blocks
    attending to `context` positions, the LM head at `head_positions` each."""
    config = model.config
    width, layers, vocab = config.n_embd, config.n_layer, config.vocab_size
    block = 2 * 12 * width * width  # qkv (3), projection (1), MLP (4 + 4): FLOPs per token
    attention = 2 * 2 * width * context  # scores and weighted sum per token
    return rows * (layers * new_positions * (block + attention) + head_positions * 2 * width * vocab)


def bare_limits(module: RBKLModule, parts: Parts, repeats: int) -> dict[str, float]:
    """The same work as a bare PyTorch loop on the same models and shapes (seconds)."""
    policy, reference = module.policy, module.reference
    parts.recording = False  # the models' forwards are still wrapped
    cache_key = "cache" if "cache" in inspect.signature(type(policy).forward).parameters else "past_key_values"
    ids, mask = module.encode_prompts(TRAIN_PROMPTS[:PROMPTS])  # left-padded as in training
    ids, mask = ids.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)
    n, prompt_len = ids.shape
    response = torch.randint(1, policy.config.vocab_size, (n, NEW_TOKENS))
    limits = {}
    with torch.no_grad():
        attention = mask.long()
        positions = position_ids(attention)
        limits["prefill"] = best_of(
            lambda: policy(
                input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1
            ),
            repeats,
        )
        # One decode step at the middle of the response (half of it in the cache), repeated.
        half = NEW_TOKENS // 2
        context = torch.cat([attention, attention.new_ones(n, half)], 1)
        prefill = policy(
            input_ids=torch.cat([ids, response[:, :half]], 1),
            attention_mask=context,
            position_ids=position_ids(context),
            use_cache=True,
        )
        cache = prefill[cache_key]
        step_mask = torch.cat([context, attention.new_ones(n, 1)], 1)

        def decode_step():
            policy(
                input_ids=response[:, :1],
                attention_mask=step_mask,
                position_ids=positions[:, -1:] + half + 1,
                use_cache=True,
                **{cache_key: cache},
            )
            cache.crop(-1)  # the same step again next time

        limits["decode forward"] = best_of(decode_step, repeats * 4)
    full_ids = torch.cat([ids, response], 1)
    full_mask = torch.cat([attention, torch.ones_like(response)], 1)
    inputs = {"input_ids": full_ids, "attention_mask": full_mask, "position_ids": position_ids(full_mask)}
    keep = torch.arange(prompt_len - 1, prompt_len + NEW_TOKENS - 1)
    limits["policy forward"] = best_of(lambda: policy(**inputs, logits_to_keep=keep).logits, repeats)
    with torch.no_grad():
        limits["reference forward"] = best_of(lambda: reference(**inputs, logits_to_keep=keep).logits, repeats)
        ref_logits = reference(**inputs, logits_to_keep=keep).logits

    def stats_loss(logits):
        logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
        token_logp = logp.gather(-1, response[..., None]).squeeze(-1)  # [N, R]
        kl = (logp.exp() * (logp - logq)).sum(-1)  # [N, R], exact over the vocabulary
        return (token_logp + kl).sum()

    logits = policy(**inputs, logits_to_keep=keep).logits
    limits["token stats"] = best_of(lambda: stats_loss(logits.detach().requires_grad_()), repeats)

    def forward_backward():
        stats_loss(policy(**inputs, logits_to_keep=keep).logits).backward()

    limits["backward"] = max(0.0, best_of(forward_backward, repeats) - limits["policy forward"] - limits["token stats"])
    weights = [p for p in policy.parameters() if p.requires_grad]
    copies = [p.detach().clone().requires_grad_() for p in weights]
    for copy in copies:
        copy.grad = torch.randn_like(copy)
    optimizer = torch.optim.AdamW(copies, lr=LR, fused=True)
    limits["optimizer step"] = best_of(optimizer.step, repeats)
    reward = module.reward
    limits["scoring"] = best_of(lambda: reward(*parts.last_texts), repeats)  # the reward alone, same texts
    module.policy_flops = {
        "prefill": matmul_flops(policy, n, prompt_len, prompt_len, 1),
        "decode forward": matmul_flops(policy, n, 1, prompt_len + NEW_TOKENS // 2, 1),
        "policy forward": matmul_flops(policy, n, prompt_len + NEW_TOKENS, prompt_len + NEW_TOKENS, NEW_TOKENS),
    }
    module.weight_bytes = sum(p.numel() for p in weights) * 4
    return limits


ROWS = [
    # (part, measured labels or None for a derived figure, limit label)
    ("sampling: prefill", ["prefill"], "prefill"),
    ("sampling: one decode forward", None, "decode forward"),
    ("sampling: one decode step, all", None, "decode forward"),
    ("sampling, whole", ["sampling"], None),
    ("scoring (text + VADER)", ["scoring"], "scoring"),
    ("training forward: policy", ["policy forward"], "policy forward"),
    ("training forward: reference", ["reference forward"], "reference forward"),
    ("token stats + loss (forward)", None, "token stats"),
    ("backward", ["backward"], "backward"),
    ("optimizer (step, zero_grad)", ["optimizer step"], "optimizer step"),
    ("statistics (estimates, study update)", ["statistics"], None),
    ("logging (row, study.compute, write)", ["logging"], None),
    ("prompt encoding (tokenizer)", ["prompt encoding"], None),
    ("seeded draws (seed, restore)", ["seeded draws"], None),
    ("other (Lightning loop, schedule)", None, None),
    ("whole step", ["step"], None),
]


def table(module: RBKLModule, parts: Parts, sampler: TimedSampler, limits: dict, warmup: int, rates) -> list[dict]:
    gemm, bandwidth = rates
    m = {label: parts.median(label, warmup) for label in {k for step in parts.steps for k in step}}
    decode_steps = statistics.median(sampler.decode_steps[warmup:])
    decode_call = m.get("decode forward", 0.0) / max(decode_steps, 1)  # mean per call
    sampling_rest = (m["sampling"] - m["prefill"] - m.get("decode forward", 0.0)) / max(decode_steps, 1)
    derived = {
        "sampling: one decode forward": decode_call,
        "sampling: one decode step, all": decode_call + sampling_rest,
        "token stats + loss (forward)": m["token stats forward"]
        - m["policy forward"]
        - m["reference forward"]
        + m.get("loss", 0.0),
    }
    covered = (  # the timed parts, none inside another
        "prompt encoding",
        "sampling",
        "scoring",
        "token stats forward",
        "loss",
        "backward",
        "optimizer step",
        "statistics",
        "logging",
        "seeded draws",
    )
    # Per step, then the median: the parts' medians need not add up to the step's.
    derived["other (Lightning loop, schedule)"] = statistics.median(
        step["step"] - sum(step.get(label, 0.0) for label in covered) for step in parts.steps[warmup:]
    )
    flops = module.policy_flops
    floors = {
        "sampling: prefill": flops["prefill"] / gemm,
        "sampling: one decode forward": flops["decode forward"] / gemm,
        "sampling: one decode step, all": flops["decode forward"] / gemm,
        "training forward: policy": flops["policy forward"] / gemm,
        "training forward: reference": flops["policy forward"] / gemm,
        "backward": 2 * flops["policy forward"] / gemm,
        "optimizer (step, zero_grad)": 7 * module.weight_bytes / bandwidth,
    }
    limit_sum = (
        limits["prefill"]
        + decode_steps * limits["decode forward"]
        + limits["scoring"]
        + limits["policy forward"]
        + limits["reference forward"]
        + limits["token stats"]
        + limits["backward"]
        + limits["optimizer step"]
    )
    rows = []
    for part, labels, limit_label in ROWS:
        measured = derived[part] if labels is None else sum(m.get(label, 0.0) for label in labels)
        limit = limits.get(limit_label) if limit_label else None
        if part == "whole step":
            limit = limit_sum
        if part == "sampling, whole":
            limit = limits["prefill"] + decode_steps * limits["decode forward"]
        rows.append({"part": part, "measured_ms": measured * 1e3, "limit_ms": None if limit is None else limit * 1e3})
        rows[-1]["floor_ms"] = floors[part] * 1e3 if part in floors else None
    return rows


def show(rows: list[dict], decode_steps: float) -> None:
    def cell(x, digits=2):
        return "-" if x is None else f"{x:.{digits}f}"

    print("| part | measured ms | limit ms | ratio | floor ms |")
    print("|---|---|---|---|---|")
    for row in rows:
        limit = row["limit_ms"]
        ratio = None if not limit else row["measured_ms"] / limit
        print(
            f"| {row['part']} | {cell(row['measured_ms'])} | {cell(limit)} | {cell(ratio)} | "
            f"{cell(row['floor_ms'], 3)} |"
        )
    print(f"(decode steps per rollout after the prefill: median {decode_steps:g})")
    # The next target: what each part spends above its limit; a part without one is all overhead.
    parts = [r for r in rows if r["part"] not in ("whole step", "sampling, whole") and "one decode" not in r["part"]]
    above = {r["part"]: r["measured_ms"] - (r["limit_ms"] or 0.0) for r in parts}
    sampling = next(r for r in rows if r["part"] == "sampling, whole")
    above["sampling, whole"] = sampling["measured_ms"] - sampling["limit_ms"]
    above.pop("sampling: prefill")
    ranked = sorted(above.items(), key=lambda item: -item[1])
    print("above the limit, largest first: " + ", ".join(f"{part} {ms:.1f} ms" for part, ms in ranked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="training steps run first, not timed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=20, help="calls per bare-loop limit")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        module, parts, sampler = run_module(args.steps, args.warmup, Path(tmp))
    limits = bare_limits(module, parts, args.repeats)
    rates = gemm_rate(), copy_bandwidth()
    rows = table(module, parts, sampler, limits, args.warmup, rates)
    decode_steps = statistics.median(sampler.decode_steps[args.warmup :])
    print(
        f"offline default step: tiny GPT-2 2 x 64, V {module.policy.config.vocab_size}, {PROMPTS} prompts x {K} "
        f"samples, {NEW_TOKENS} new tokens; {args.steps} timed steps after {args.warmup}; "
        f"{torch.get_num_threads()} threads; "
        f"GEMM {rates[0] / 1e9:.1f} GFLOP/s, copy {rates[1] / 1e9:.1f} GB/s; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    show(rows, decode_steps)
    print(json.dumps({"benchmark": "step_profile", "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
