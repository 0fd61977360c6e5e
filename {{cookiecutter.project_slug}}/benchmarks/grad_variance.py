"""What `updates.track_grad_variance` adds to one validation batch of the offline default.

    python benchmarks/grad_variance.py                   # 8 prompts x 8 samples, contrasts 1 and exact
    python benchmarks/grad_variance.py --prompts 4 --repeats 3

Times, best of `--repeats`, the parts of one validation batch on the CPU: the rollout (sampling
and the VADER reward), the statistics every validation computes (`model_step` without the loss)
and the gradient variance (grad_variance.py) with one contrast per prompt (the default) and with
M - 1 (exact). Prints one line per setting and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from {{ cookiecutter.package_name }}.training.data import PromptDataModule
from {{ cookiecutter.package_name }}.training.module import RBKLModule
from {{ cookiecutter.package_name }}.training.options import Sampling, Updates
from {{ cookiecutter.package_name }}.training.rewards import VaderSentimentReward


def best_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def time_setting(contrasts: int, prompt_count: int, samples: int, repeats: int) -> dict[str, float]:
    """Seconds of one validation batch's rollout, statistics and gradient variance with `contrasts`."""
    module = RBKLModule(
        reward=VaderSentimentReward(),
        sampling=Sampling(max_new_tokens=12, val_samples_per_prompt=samples),  # as configs/default.yaml
        updates=Updates(track_grad_variance=True, grad_variance_contrasts=contrasts),
    )
    data = PromptDataModule(batch_size=prompt_count)
    data.setup("fit")
    prompts = data.val_prompts[:prompt_count]
    rollout = module.rollout(prompts, samples)
    with torch.no_grad():
        rollout_s = best_seconds(lambda: module.rollout(prompts, samples), repeats)
        statistics_s = best_seconds(lambda: module.model_step(rollout, with_loss=False), repeats)
    grad_variance_s = best_seconds(lambda: module.grad_variance(rollout, 0), repeats)
    return {
        "rollout_s": rollout_s,
        "statistics_s": statistics_s,
        f"grad_variance_{contrasts}_contrasts_s": grad_variance_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, help="validation prompts in the batch")
    parser.add_argument("--samples", type=int, default=8, help="val_samples_per_prompt (M)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per part; the best is reported")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for contrasts in (1, args.samples - 1):
        # The rollout and statistics do not depend on the contrasts: the first setting's are kept.
        results = {**time_setting(contrasts, args.prompts, args.samples, args.repeats), **results}
    for name, seconds in results.items():
        print(f"{name:<32} {seconds * 1e3:8.0f} ms")
    print(json.dumps({"prompts": args.prompts, "samples": args.samples, **results}))


if __name__ == "__main__":
    main()
