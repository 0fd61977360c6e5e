"""RB vs MC: training-step time and peak memory, measured side by side in one process.

    python benchmarks/step.py                      # shapes a and b, CPU or the first GPU
    python benchmarks/step.py --shapes a --pairs 9 --dtype bfloat16 --with-generation

Each pair runs one training step with the MC KL gradient and one with the RB gradient, in
alternating order, on the same fixed samples (random-init GPT-2, no download). A step is the
policy and reference forward on prompt + response, every KL estimate, the RLOO loss, backward
and the AdamW update; with --with-generation it also samples the responses. Prints the median
rb/mc time ratio and the rb/mc ratio of the step's peak memory (above the memory held before
the step), as plain lines and as one JSON line.

Shapes (GPT-2 architecture, vocabulary 50257, 16 responses x 64 tokens after an 8-token prompt):
    a  2 layers x 256 wide: the vocabulary dominates the step
    b  12 layers x 768 wide: GPT-2 small
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from {{ cookiecutter.package_name }}.estimators import all_kl_values
from {{ cookiecutter.package_name }}.module import RBKLModule
from {{ cookiecutter.package_name }}.rewards import KeywordReward
from {{ cookiecutter.package_name }}.sampling import Samples, response_mask

SHAPES = {"a": {"n_layer": 2, "n_embd": 256, "n_head": 4}, "b": {"n_layer": 12, "n_embd": 768, "n_head": 12}}
VOCAB, RESPONSES, PROMPT_LEN, RESPONSE_LEN, K = 50257, 16, 8, 64, 2


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


def build_module(shape: str, dtype: str, folder: Path, device: torch.device) -> RBKLModule:
    config = GPT2Config(vocab_size=VOCAB, n_positions=128, **SHAPES[shape], eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)  # loaded back through from_pretrained, as in training
    module = RBKLModule(
        policy=str(folder),
        tokenizer="builtin:tiny-gpt2",  # any tokenizer that fits the vocabulary; only ids matter here
        reward=KeywordReward(["good"]),
        samples_per_prompt=K,
        max_new_tokens=RESPONSE_LEN,
        dtype=dtype,
        lr=1e-6,
    )
    return module.to(device)


def fixed_samples(device: torch.device) -> Samples:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, VOCAB, (RESPONSES, PROMPT_LEN), generator=gen)
    response = torch.randint(1, VOCAB, (RESPONSES, RESPONSE_LEN), generator=gen)
    response[::4, 40] = 0  # a quarter of the responses end early with EOS
    prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
    return Samples(
        prompt.to(device), prompt_mask.to(device), response.to(device), response_mask(response, 0).to(device)
    )


def training_step(module: RBKLModule, optimizer, samples: Samples, kl_gradient: str, generate: bool) -> None:
    module.hparams.kl_gradient = kl_gradient
    if generate:
        prompts = ["the movie was"] * (RESPONSES // K)
        samples = module.sample(prompts, K)
    rewards = torch.randn(samples.response.shape[0], device=samples.response.device)
    stats = module.token_stats(samples, kl_grad=kl_gradient == "rb")
    loss = module.compute_loss(stats, samples, rewards).loss
    all_kl_values(stats, samples.response_mask)  # what training_step logs, in both modes
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(module: RBKLModule, samples: Samples, pairs: int, generate: bool) -> dict:
    device = samples.response.device
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=1e-6)
    times = {"mc": [], "rb": []}
    peaks = {"mc": [], "rb": []}
    for name in ("mc", "rb"):  # warm-up: allocator, optimizer state, kernels
        training_step(module, optimizer, samples, name, generate)
    for i in range(pairs):
        order = ("mc", "rb") if i % 2 == 0 else ("rb", "mc")
        for name in order:
            torch.manual_seed(i)  # the same generated samples for both members of a pair
            with PeakMemory(device) as mem:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                training_step(module, optimizer, samples, name, generate)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
            peaks[name].append(mem.peak)
    ratios = [rb / mc for rb, mc in zip(times["rb"], times["mc"], strict=True)]
    return {
        "mc_step_s": statistics.median(times["mc"]),
        "rb_step_s": statistics.median(times["rb"]),
        "time_ratio_rb_over_mc": statistics.median(ratios),
        "mc_peak_mib": statistics.median(peaks["mc"]) / 2**20,
        "rb_peak_mib": statistics.median(peaks["rb"]) / 2**20,
        "peak_ratio_rb_over_mc": statistics.median(peaks["rb"]) / statistics.median(peaks["mc"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="a,b", help="comma-separated: a (2x256), b (12x768, GPT-2 small)")
    parser.add_argument("--pairs", type=int, default=5, help="mc/rb step pairs per shape (>= 5)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--with-generation", action="store_true", help="also sample the responses in each step")
    args = parser.parse_args()
    if args.pairs < 5:
        parser.error("--pairs must be at least 5")
    device = torch.device(args.device)
    results = []
    for shape in args.shapes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            module = build_module(shape, args.dtype, Path(tmp), device)
        samples = fixed_samples(device)
        result = measure(module, samples, args.pairs, args.with_generation)
        result.update(
            shape=shape,
            device=str(device),
            dtype=args.dtype,
            generation=args.with_generation,
            threads=torch.get_num_threads(),
            pairs=args.pairs,
        )
        results.append(result)
        print(
            f"shape {shape} ({SHAPES[shape]['n_layer']}x{SHAPES[shape]['n_embd']}, V={VOCAB}, "
            f"{RESPONSES}x{RESPONSE_LEN}) {device} {args.dtype}{' +generation' if args.with_generation else ''}: "
            f"mc {result['mc_step_s'] * 1e3:.0f} ms, rb {result['rb_step_s'] * 1e3:.0f} ms, "
            f"time rb/mc {result['time_ratio_rb_over_mc']:.3f}; "
            f"peak mc {result['mc_peak_mib']:.0f} MiB, rb {result['rb_peak_mib']:.0f} MiB, "
            f"peak rb/mc {result['peak_ratio_rb_over_mc']:.3f}",
            flush=True,
        )
        del module
    print(json.dumps({"benchmark": "step", "pid": os.getpid(), "results": results}))


if __name__ == "__main__":
    main()
