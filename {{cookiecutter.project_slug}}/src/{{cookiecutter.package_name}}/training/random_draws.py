"""Where a batch's random draws come from: a seed per (run seed, rank, stage, step, batch), not
one stream that runs through the whole fit.

With one global stream, what a batch draws depends on everything drawn before it (validation
included), so a resumed run repeats the uninterrupted one only if the checkpoint caught the stream
at exactly the right moment, and only on the rank whose state it saved. Seeding every batch from
its coordinates makes the draws a function of where the batch is: any checkpoint, whatever wrote
it, resumes to the same draws on every rank, and validating more or less often does not move
training's samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def batch_seed(run_seed: int, rank: int, stage: str, step: int, batch_idx: int = 0) -> int:
    """A 63-bit seed for one batch; distinct coordinates give unrelated streams."""
    key = f"{run_seed}/{rank}/{stage}/{step}/{batch_idx}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


@contextmanager
def seeded_draws(seed: int, device: torch.device) -> Iterator[None]:
    """Every torch draw inside comes from `seed` (CPU and the device); the global state is put back after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # Only the generators this batch draws from: the same draws. torch.manual_seed also queues a
        # seed for every backend not yet initialised (CUDA, XPU, MTIA on a CPU run) and formats the
        # Python stack for each: 0.7 ms a batch under Lightning's stack, and the garbage it leaves.
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        elif device.type != "cpu":
            torch.manual_seed(seed)  # another accelerator: every generator, as before
        yield
