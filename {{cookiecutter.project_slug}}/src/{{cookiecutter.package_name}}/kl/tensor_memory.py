"""The peak memory held by CPU tensors while a function runs, from torch.profiler's allocation records.

On a CPU the process's resident-set high-water mark also counts what the allocator keeps after a
free, and it moves from run to run; the profiler's record of every allocation and free does not.
(On a GPU, torch.cuda.max_memory_allocated says the same.) benchmarks/step.py prints both, and
tests/test_fused_head.py bounds the fused op by it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """The most bytes held at once by CPU tensors allocated during `fn()` (what was held before excluded)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for record in sorted(records, key=lambda e: e.start_ns()):
        held += record.nbytes()
        peak = max(peak, held)
    return peak
