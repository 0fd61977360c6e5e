"""Rollout sampling: the fast decode loop against Hugging Face generate, side by side in one process.

    python benchmarks/sampling.py                     # every shape below, CPU or the first GPU
    python benchmarks/sampling.py --shapes tiny-50k --pairs 9
    python benchmarks/sampling.py --static            # also a static cache, and compiled decode steps

Each round samples the same prompts once with each sampler (rotating order, the same seed),
8 prompts x 2 samples, up to 32 new tokens, from a random GPT-2 that never emits EOS (so all
run every step). Prints each sampler's median time and the median per-round ratio to hf (and,
with --static, of "static" and "compiled" to "fast"). The compiled decode step uses CUDA graphs
on a GPU; its compilation happens in the warm-up, which is not timed.

Shapes (GPT-2 architecture):
    tiny-50k   2 layers x 64, vocabulary 50257: the sampler dominates
    tiny-2k    2 layers x 64, vocabulary 2000
    small-50k  2 layers x 256, vocabulary 50257
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch

from {{ cookiecutter.package_name }}.models.loading import tiny_gpt2
from {{ cookiecutter.package_name }}.models.sampler import sample_fast, sample_responses, sampling_config, static_cache

SHAPES = {
    "tiny-50k": {"vocab": 50257, "n_embd": 64, "n_head": 2},
    "tiny-2k": {"vocab": 2000, "n_embd": 64, "n_head": 2},
    "small-50k": {"vocab": 50257, "n_embd": 256, "n_head": 4},
}
PROMPTS, K, PROMPT_LEN, NEW_TOKENS, EOS = 8, 2, 8, 32, 0


def build(shape: str, device: torch.device):
    spec = SHAPES[shape]
    model = tiny_gpt2(spec["vocab"], EOS, seed=0, n_embd=spec["n_embd"], n_head=spec["n_head"], n_positions=64)
    with torch.no_grad():
        model.lm_head.weight[EOS] = -1e4  # never ends early: both samplers run every step (tied to wte)
    return model.eval().to(device)


def measure(
    model, ids: torch.Tensor, mask: torch.Tensor, pairs: int, device: torch.device, static: bool
) -> dict[str, list[float]]:
    config = sampling_config(NEW_TOKENS, EOS, EOS)
    samplers = {
        "fast": partial(sample_fast, model, ids, mask, K, NEW_TOKENS, [EOS], EOS),
        "hf": partial(sample_responses, model, ids, mask, K, config),
    }
    if static:
        cache = static_cache(model, PROMPT_LEN + NEW_TOKENS)  # one cache, reset per call, as the module does
        mode = "reduce-overhead" if device.type == "cuda" else None
        compiled = torch.compile(model.forward, mode=mode, dynamic=False)

        def with_static_cache(decode=None):
            cache.reset()
            return sample_fast(model, ids, mask, K, NEW_TOKENS, [EOS], EOS, cache=cache, decode=decode)

        samplers["static"] = with_static_cache
        samplers["compiled"] = partial(with_static_cache, compiled)
    for run in samplers.values():  # warm-up (and compilation)
        run()
        run()
    names = list(samplers)
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for i in range(pairs):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            torch.manual_seed(i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            samples = samplers[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            assert samples.response.shape[1] == NEW_TOKENS
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    parser.add_argument("--pairs", type=int, default=7, help="fast/hf pairs per shape (>= 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--static", action="store_true", help="also time a static cache and compiled decode steps")
    args = parser.parse_args()
    if args.pairs < 3:
        parser.error("--pairs must be at least 3")
    device = torch.device(args.device)
    results = []
    for shape in args.shapes.split(","):
        model = build(shape, device)
        vocab = SHAPES[shape]["vocab"]
        ids = torch.randint(1, vocab, (PROMPTS, PROMPT_LEN), generator=torch.Generator().manual_seed(0)).to(device)
        times = measure(model, ids, torch.ones_like(ids, dtype=torch.bool), args.pairs, device, args.static)
        ratio = statistics.median(f / h for f, h in zip(times["fast"], times["hf"], strict=True))
        result = {
            "shape": shape,
            "device": str(device),
            "fast_s": statistics.median(times["fast"]),
            "hf_s": statistics.median(times["hf"]),
            "ratio_fast_over_hf": ratio,
            "threads": torch.get_num_threads(),
        }
        for name in ("static", "compiled") if args.static else ():
            result[f"{name}_s"] = statistics.median(times[name])
            result[f"ratio_{name}_over_fast"] = statistics.median(
                s / f for s, f in zip(times[name], times["fast"], strict=True)
            )
        results.append(result)
        print(
            f"{shape} (V={vocab}, {PROMPTS}x{K} samples, {NEW_TOKENS} tokens) {device}: fast "
            f"{result['fast_s'] * 1e3:.0f} ms, hf {result['hf_s'] * 1e3:.0f} ms, fast/hf {ratio:.3f}",
            flush=True,
        )
        for name in ("static", "compiled") if args.static else ():
            print(f"  {name} {result[f'{name}_s'] * 1e3:.0f} ms, {name}/fast {result[f'ratio_{name}_over_fast']:.3f}")
    print(json.dumps({"benchmark": "sampling", "pairs": args.pairs, "results": results}))


if __name__ == "__main__":
    main()
