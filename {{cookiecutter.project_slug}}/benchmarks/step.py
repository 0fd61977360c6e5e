"""RB vs MC: training-step time and peak memory, measured side by side in one process.

    python benchmarks/step.py                      # shapes a and b, both APIs, CPU or the first GPU
    python benchmarks/step.py --shapes a --pairs 9 --dtype bfloat16 --with-generation
    python benchmarks/step.py --api public         # only the public functions
    python benchmarks/step.py --api fused          # fused LM head vs materialised logits vs peer k3
    python benchmarks/step.py --api fused --vocab-sweep

Each pair runs one step with the MC KL gradient and one with the RB gradient, in alternating
order, on the same fixed samples (random-init GPT-2, no download). Two ways to take a step:

    module  RBKLModule.model_step, the code that trains: policy and reference forward on prompt +
            response (LM head on response positions only), every KL estimate, the RLOO loss
    public  what a user of the estimators writes in their own trainer: plain logits
            `model(ids).logits[:, P - 1 : -1]` into `kl_grad_surrogate(...)`, beta times its mean
            ("lean": `logits_to_keep` for the response positions and `inplace=True`, as the
            module does)

then backward and the AdamW update; with --with-generation the module step also samples the
responses. Prints, per API, the median rb/mc time ratio and the rb/mc ratio of the step's peak
memory (above the memory held before the step), and the public rb steps (lean and plain)
against the module's rb step, as plain lines and as one JSON line. On a CPU the peak is the
resident set's high-water mark, which counts what the allocator keeps and moves between runs, so
one more untimed step of each is profiled for the "tensor peak": the most bytes tensors held.

`--api fused` times the RB step with `updates.fused_lm_head` (hidden states and LM heads into
fused_head.py, no [N, R, V] logits) against the same step on materialised logits, and against
a peer-style step (both models' logits, log_softmax + gather, k3 per token in the loss, as TRL,
OpenRLHF and verl do); `--vocab-sweep` the fused and materialised RB steps of shape a at four
vocabulary sizes.

Shapes (random weights, 16 responses x 64 tokens after an 8-token prompt):
    a  GPT-2 2 layers x 256 wide, V 50257: the vocabulary dominates the step
    q  Qwen2 2 layers x 256 wide, grouped-query attention, tied head, V 151936
    b  GPT-2 12 layers x 768 wide, V 50257: GPT-2 small
    q05  Qwen2-0.5B's shape, V 151936, random weights: for a GPU (about 5 TFLOP a step)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from {{ cookiecutter.package_name }}.kl.estimators import kl_grad_surrogate
from {{ cookiecutter.package_name }}.kl.tensor_memory import peak_tensor_bytes
from {{ cookiecutter.package_name }}.models.sampler import Samples, position_ids, response_mask
from {{ cookiecutter.package_name }}.training.module import RBKLModule, Rollout
from {{ cookiecutter.package_name }}.training.optimizer import adamw
from {{ cookiecutter.package_name }}.training.options import Optimization, Sampling
from {{ cookiecutter.package_name }}.training.rewards import KeywordReward

GPT2_VOCAB, QWEN2_VOCAB = 50257, 151936
SHAPES = {
    "a": {"arch": "gpt2", "n_layer": 2, "n_embd": 256, "n_head": 4, "vocab": GPT2_VOCAB},
    "q": {"arch": "qwen2", "n_layer": 2, "n_embd": 256, "n_head": 4, "kv_heads": 1, "vocab": QWEN2_VOCAB},
    "b": {"arch": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab": GPT2_VOCAB},
    # Qwen2-0.5B's shape (24 x 896, 14 heads over 2 key-value heads, MLP 4864, tied head): for a GPU
    "q05": {
        "arch": "qwen2",
        "n_layer": 24,
        "n_embd": 896,
        "n_head": 14,
        "kv_heads": 2,
        "mlp": 4864,
        "vocab": QWEN2_VOCAB,
    },
}
RESPONSES, PROMPT_LEN, RESPONSE_LEN, K = 16, 8, 64, 2


def save_random_model(shape: str, folder: Path, vocab: int | None = None) -> int:
    """A random model of `shape` saved to `folder`; returns its vocabulary size."""
    spec = SHAPES[shape]
    vocab = vocab or spec["vocab"]
    torch.manual_seed(0)
    if spec["arch"] == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_positions=128, n_layer=spec["n_layer"], n_embd=spec["n_embd"], n_head=spec["n_head"]
        )
        config.eos_token_id = config.bos_token_id = 0
        model = GPT2LMHeadModel(config)
    else:  # Qwen2 as its 0.5B model is built: grouped-query attention, a tied head
        config = Qwen2Config(
            vocab_size=vocab,
            hidden_size=spec["n_embd"],
            intermediate_size=spec.get("mlp", 4 * spec["n_embd"]),
            num_hidden_layers=spec["n_layer"],
            num_attention_heads=spec["n_head"],
            num_key_value_heads=spec["kv_heads"],
            max_position_embeddings=128,
            tie_word_embeddings=True,
            eos_token_id=0,
            bos_token_id=0,
        )
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)  # loaded back through from_pretrained, as in training
    return vocab


class PeakMemory:
    """Peak memory of a block above what was held before it: CUDA allocator stats, or on CPU the
    process's resident-set high-water mark (reset through /proc/self/clear_refs, Linux)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = self._status("VmHWM") - self.base

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")


def build_module(
    shape: str,
    dtype: str,
    folder: Path,
    device: torch.device,
    cls: type[RBKLModule] = RBKLModule,
    vocab: int | None = None,
    **groups,
) -> RBKLModule:
    """A random model of `shape`, saved and loaded back as a policy; `groups` (updates, lora) go to `cls`."""
    save_random_model(shape, folder, vocab)
    module = cls(
        policy=str(folder),
        tokenizer="builtin:tiny-gpt2",  # any tokenizer that fits the vocabulary; only ids matter here
        reward=KeywordReward(["good"]),
        dtype=dtype,
        sampling=Sampling(samples_per_prompt=K, max_new_tokens=RESPONSE_LEN),
        optimization=Optimization(lr=1e-6),
        **groups,
    )
    return module.to(device)


def quiet_trainer(**settings) -> L.Trainer:
    """A CPU Trainer that prints and writes nothing unless asked: the benchmarks time its steps."""
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
    }
    return L.Trainer(**{**defaults, **settings})


def fixed_samples(device: torch.device, vocab: int = GPT2_VOCAB) -> Samples:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, vocab, (RESPONSES, PROMPT_LEN), generator=gen)
    response = torch.randint(1, vocab, (RESPONSES, RESPONSE_LEN), generator=gen)
    response[::4, 40] = 0  # a quarter of the responses end early with EOS
    prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
    return Samples(
        prompt.to(device), prompt_mask.to(device), response.to(device), response_mask(response, 0).to(device)
    )


def fixed_rollout(samples: Samples) -> Rollout:
    rewards = torch.randn(samples.response.shape[0], generator=torch.Generator().manual_seed(1))
    return Rollout(["the movie was"] * (RESPONSES // K), samples, rewards.to(samples.response.device), K)


def module_step(module: RBKLModule, rollout: Rollout, kl_gradient: str, generate: bool, fused: bool = False) -> None:
    # model_step reads the module's option groups: both estimators, both head paths on one module.
    module.objective = dataclasses.replace(module.objective, kl_gradient=kl_gradient)
    module.updates = dataclasses.replace(module.updates, fused_lm_head=fused)
    if generate:
        rollout = module.rollout(rollout.prompts, K)
    module.model_step(rollout).loss.loss.backward()


def fused_module_step(module: RBKLModule, rollout: Rollout, kl_gradient: str, generate: bool) -> None:
    module_step(module, rollout, kl_gradient, generate, fused=True)


def peer_k3_step(module: RBKLModule, rollout: Rollout, kl_gradient: str, generate: bool) -> None:
    # What RL libraries do for the KL penalty (TRL, OpenRLHF, verl): both models' logits at the
    # response positions, log_softmax + gather of the sampled token, k3 per token in the loss.
    samples = rollout.samples
    inputs = {
        "input_ids": samples.input_ids,
        "attention_mask": samples.attention_mask.long(),
        "position_ids": position_ids(samples.attention_mask),
    }
    positions = slice(samples.prompt_ids.shape[1] - 1, -1)
    tokens, mask = samples.response.unsqueeze(-1), samples.response_mask
    logp = torch.log_softmax(module.policy(**inputs).logits[:, positions].float(), -1).gather(-1, tokens)
    with torch.no_grad():
        logq = torch.log_softmax(module.reference(**inputs).logits[:, positions].float(), -1).gather(-1, tokens)
    log_ratio = (logq - logp).squeeze(-1)  # [N, R]
    k3 = (torch.exp(log_ratio) - log_ratio - 1) * mask
    (module.objective.beta * k3.sum(-1).mean()).backward()


def public_step(module: RBKLModule, rollout: Rollout, kl_gradient: str, generate: bool, lean: bool = False) -> None:
    # Written as a user's own training step. Plain: the LM head on every position, sliced, and the
    # logits held until backward. Lean: the LM head on response positions only, the logits handed
    # over as scratch (inplace=True) and not held: what the module itself does.
    samples = rollout.samples
    inputs = {
        "input_ids": samples.input_ids,
        "attention_mask": samples.attention_mask.long(),
        "position_ids": position_ids(samples.attention_mask),
    }
    prompt_len, response_len = samples.prompt_ids.shape[1], samples.response.shape[1]
    if lean:
        keep = torch.arange(prompt_len - 1, prompt_len + response_len - 1, device=samples.response.device)
        logits = module.policy(**inputs, logits_to_keep=keep).logits
        with torch.no_grad():
            ref_logits = module.reference(**inputs, logits_to_keep=keep).logits
    else:
        positions = slice(prompt_len - 1, -1)  # the logits that produced the response
        logits = module.policy(**inputs).logits[:, positions]
        with torch.no_grad():
            ref_logits = module.reference(**inputs).logits[:, positions]
    surrogate = kl_grad_surrogate(
        logits, ref_logits, samples.response, samples.response_mask, kl_gradient, inplace=lean
    )
    if lean:
        del logits, ref_logits  # the op keeps what backward needs; the rest is freed as backward goes
    (module.objective.beta * surrogate.mean()).backward()


def lean_public_step(module: RBKLModule, rollout: Rollout, kl_gradient: str, generate: bool) -> None:
    public_step(module, rollout, kl_gradient, generate, lean=True)


STEPS = {
    "module": module_step,
    "public": public_step,
    "public_lean": lean_public_step,
    "fused": fused_module_step,
    "peer": peer_k3_step,
}
# (label, first step, second step): each ratio is second / first, median over alternating pairs.
COMPARISONS = {
    "module": ("module rb/mc", ("module", "mc"), ("module", "rb")),
    "public": ("public rb/mc", ("public", "mc"), ("public", "rb")),
    "public_lean_vs_module": ("rb public lean/module", ("module", "rb"), ("public_lean", "rb")),
    "public_vs_module": ("rb public plain/module", ("module", "rb"), ("public", "rb")),
    "fused_vs_materialised": ("rb fused/materialised", ("module", "rb"), ("fused", "rb")),
    "fused_vs_peer_k3": ("rb fused/peer k3", ("peer", "k3"), ("fused", "rb")),
}
API_COMPARISONS = {
    "module": ["module"],
    "public": ["public"],
    "fused": ["fused_vs_materialised", "fused_vs_peer_k3"],
    "both": ["module", "public", "public_lean_vs_module", "public_vs_module"],
}


def measure(module: RBKLModule, rollout: Rollout, first, second, pairs: int, generate: bool) -> dict:
    device = rollout.samples.response.device
    optimizer = adamw([p for p in module.policy.parameters() if p.requires_grad], lr=1e-6)  # the module's

    def step(which: tuple[str, str]) -> None:
        api, kl_gradient = which
        STEPS[api](module, rollout, kl_gradient, generate)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[int, list[float]] = {0: [], 1: []}
    peaks: dict[int, list[int]] = {0: [], 1: []}
    for which in (first, second):  # warm-up: allocator, optimizer state, kernels
        step(which)
    for i in range(pairs):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            torch.manual_seed(i)  # the same generated samples for both members of a pair
            with PeakMemory(device) as mem:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step((first, second)[j])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[j].append(time.perf_counter() - start)
            peaks[j].append(mem.peak)
    ratios = [b / a for a, b in zip(times[0], times[1], strict=True)]
    # One more step of each under the profiler, untimed: what the tensors need, without the allocator.
    tensor_peaks = [0.0, 0.0]
    if device.type == "cpu":
        tensor_peaks = [peak_tensor_bytes(lambda w=which: step(w)) / 2**20 for which in (first, second)]
    return {
        "first": "/".join(first),
        "second": "/".join(second),
        "first_step_s": statistics.median(times[0]),
        "second_step_s": statistics.median(times[1]),
        "time_ratio": statistics.median(ratios),
        "first_peak_mib": statistics.median(peaks[0]) / 2**20,
        "second_peak_mib": statistics.median(peaks[1]) / 2**20,
        "peak_ratio": statistics.median(peaks[1]) / statistics.median(peaks[0]),
        "first_tensor_peak_mib": tensor_peaks[0],
        "second_tensor_peak_mib": tensor_peaks[1],
    }


def run_shape(shape: str, args, device: torch.device, comparisons: list[str], vocab: int | None = None) -> list[dict]:
    vocab = vocab or SHAPES[shape]["vocab"]
    with tempfile.TemporaryDirectory() as tmp:
        module = build_module(shape, args.dtype, Path(tmp), device, vocab=vocab)
    rollout = fixed_rollout(fixed_samples(device, vocab))
    spec, results = SHAPES[shape], []
    for key in comparisons:
        label, first, second = COMPARISONS[key]
        result = measure(module, rollout, first, second, args.pairs, args.with_generation)
        result.update(
            comparison=key,
            shape=shape,
            vocab=vocab,
            device=str(device),
            dtype=args.dtype,
            generation=args.with_generation,
            threads=torch.get_num_threads(),
            pairs=args.pairs,
        )
        results.append(result)
        print(
            f"shape {shape} ({spec['arch']} {spec['n_layer']}x{spec['n_embd']}, V={vocab}, "
            f"{RESPONSES}x{RESPONSE_LEN}) {device} {args.dtype}{' +generation' if args.with_generation else ''} "
            f"{label}: {result['first_step_s'] * 1e3:.0f} -> {result['second_step_s'] * 1e3:.0f} ms, "
            f"time {result['time_ratio']:.3f}; peak {result['first_peak_mib']:.0f} -> "
            f"{result['second_peak_mib']:.0f} MiB, peak {result['peak_ratio']:.3f}{tensor_peak_text(result)}",
            flush=True,
        )
    return results


def tensor_peak_text(result: dict) -> str:
    first, second = result["first_tensor_peak_mib"], result["second_tensor_peak_mib"]
    if not first:  # CUDA: the peak above is already the allocator's count of tensors
        return ""
    return f"; tensor peak {first:.0f} -> {second:.0f} MiB, {second / first:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", default=None, help="comma-separated: a, q, b, q05 (default a,b; with --api fused a,q,b)"
    )
    parser.add_argument("--api", default="both", choices=list(API_COMPARISONS), help="which steps to time")
    parser.add_argument("--pairs", type=int, default=9, help="step pairs per comparison (>= 5)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--with-generation", action="store_true", help="module steps also sample the responses")
    parser.add_argument(
        "--vocab-sweep", action="store_true", help="shape a at V = 8k, 32k, 50k, 152k: fused vs materialised rb"
    )
    args = parser.parse_args()
    if args.pairs < 5:
        parser.error("--pairs must be at least 5")
    if args.with_generation and args.api != "module":
        parser.error("--with-generation times the module's steps only: add --api module")
    device = torch.device(args.device)
    results = []
    if args.vocab_sweep:
        for vocab in (8192, 32768, GPT2_VOCAB, QWEN2_VOCAB):
            results += run_shape("a", args, device, ["fused_vs_materialised"], vocab=vocab)
            # The head's own float32 weight gradient, which no chunking removes.
            head_mib = vocab * SHAPES["a"]["n_embd"] * 4 / 2**20
            print(f"  V={vocab}: the head's weight gradient alone is {head_mib:.0f} MiB")
    else:
        shapes = args.shapes or ("a,q,b" if args.api == "fused" else "a,b")
        for shape in shapes.split(","):
            results += run_shape(shape, args, device, API_COMPARISONS[args.api])
    print(json.dumps({"benchmark": "step", "pid": os.getpid(), "results": results}))


if __name__ == "__main__":
    main()
