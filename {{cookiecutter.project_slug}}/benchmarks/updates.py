"""PPO epochs and LoRA: time per sampled response and the run's peak memory, side by side.

    python benchmarks/updates.py                  # GPT-2 2 layers x 256, vocabulary 50257, CPU
    python benchmarks/updates.py --batches 6 --shape b

Each setting trains a few batches through Lightning (the real `training_step`: statistics at
the sampling weights, ppo_epochs x minibatches optimizer steps) on one fixed rollout of 16
responses x 64 tokens (sampling is left out: it costs the same in every setting). Each runs in
its own child process, so its peak resident memory (models, optimizer state and the step's
peak) is its own:

    full-ppo1   full fine-tuning, a reference copy, 1 update per batch (the default)
    full-ppo4   the same with ppo_epochs 4 (the paper's recipe)
    lora-ppo1   LoRA (r 8 on c_attn, c_proj, c_fc), the policy with its adapter off as reference
    lora-ppo4   LoRA with ppo_epochs 4

Prints the median time per batch and per response (the first batch is warm-up), the peak
memory, and the ratios ppo4/ppo1 (time) and lora/full (memory), as lines and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from step import RESPONSES, SHAPES, K, PeakMemory, build_module, fixed_rollout, fixed_samples, quiet_trainer
from torch.utils.data import DataLoader

from {{ cookiecutter.package_name }}.training.module import RBKLModule, Rollout
from {{ cookiecutter.package_name }}.training.options import LoRA, Updates

LORA = LoRA(r=8, target_modules=["c_attn", "c_proj", "c_fc"])
SETTINGS = {
    "full-ppo1": {},
    "full-ppo4": {"updates": Updates(ppo_epochs=4)},
    "lora-ppo1": {"lora": LORA},
    "lora-ppo4": {"lora": LORA, "updates": Updates(ppo_epochs=4)},
}


class FixedRollout(RBKLModule):
    """The same responses every batch, no sampling: it costs the same in every setting."""

    fixed: Rollout

    def rollout(self, prompts, k):
        return self.fixed


class BatchTimes(L.Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_start(self, *args):
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self.start)


def child(setting: str, shape: str, batches: int) -> dict:
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder, PeakMemory(device) as peak:
        module = build_module(shape, "float32", Path(folder), device, FixedRollout, **SETTINGS[setting])
        module.fixed = fixed_rollout(fixed_samples(device))
        times = BatchTimes()
        trainer = quiet_trainer(max_steps=batches * module.updates.per_batch, callbacks=[times])
        prompts = DataLoader(["the movie was"] * (RESPONSES // K) * batches, batch_size=RESPONSES // K, collate_fn=list)
        trainer.fit(module, prompts)
    batch = statistics.median(times.times[1:])
    return {"batch_s": batch, "per_response_s": batch / RESPONSES, "peak_mib": peak.peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="a")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.shape, args.batches)))
        return
    results = {}
    for setting in SETTINGS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", setting, "--shape", args.shape, "--batches", str(args.batches)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[setting] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[setting]
        per_response = r["per_response_s"] * 1e3
        print(f"{setting:10s} {r['batch_s']:.3f} s/batch  {per_response:.1f} ms/response  {r['peak_mib']:.0f} MiB")
    ratios = {
        "time_ppo4_over_ppo1_full": results["full-ppo4"]["batch_s"] / results["full-ppo1"]["batch_s"],
        "time_ppo4_over_ppo1_lora": results["lora-ppo4"]["batch_s"] / results["lora-ppo1"]["batch_s"],
        "memory_lora_over_full_ppo1": results["lora-ppo1"]["peak_mib"] / results["full-ppo1"]["peak_mib"],
        "memory_lora_over_full_ppo4": results["lora-ppo4"]["peak_mib"] / results["full-ppo4"]["peak_mib"],
    }
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    print(json.dumps({"shape": args.shape, "settings": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
