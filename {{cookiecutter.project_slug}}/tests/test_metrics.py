"""RunningMoments: exact float64 moments, order-free merging, and exact DDP sync."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from {{ cookiecutter.package_name }}.metrics import RunningMoments, batch_moments, merge_moments

SIZES = [1, 7, 100, 3, 250, 2]


def batches(seed: int, loc: float = 1e4, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [loc + scale * torch.randn(n, generator=gen, dtype=torch.float64).float() for n in SIZES]


def reference(values: np.ndarray) -> dict[str, float]:
    var = values.var(ddof=1)
    return {
        "mean": values.mean(),
        "var": var,
        "std": np.sqrt(var),
        "sem": np.sqrt(var / len(values)),
        "neg_frac": (values < 0).mean(),
    }


@pytest.mark.parametrize("loc", [1e4, 0.0, -3.0])
def test_matches_numpy_float64_on_uneven_batches(loc):
    data = batches(0, loc=loc)
    metric = RunningMoments()
    for b in data:
        metric.update(b)
    got = metric.compute()
    want = reference(torch.cat(data).double().numpy())
    for key, value in want.items():
        assert got[key].item() == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_float32_sum_of_squares_would_lose_the_variance():
    # Why the metric keeps float64 mean and M2: the naive formula is off by orders of magnitude here.
    x = torch.cat(batches(1, loc=1e4))
    naive = ((x**2).sum() - x.sum() ** 2 / len(x)) / (len(x) - 1)
    exact = x.double().var().item()
    assert abs(naive.item() - exact) > 0.5 * exact
    metric = RunningMoments()
    metric.update(x)
    assert metric.compute()["var"].item() == pytest.approx(exact, rel=1e-9)


def test_merge_order_does_not_matter():
    parts = torch.stack([batch_moments(b) for b in batches(2)])
    first = merge_moments(parts)
    for seed in range(5):
        perm = torch.randperm(len(parts), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(merge_moments(parts[perm]), first, rtol=1e-12, atol=1e-9)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_empty_metric_reports_nan_and_reset_clears():
    metric = RunningMoments()
    assert torch.isnan(metric.compute()["mean"])
    metric.update(torch.tensor([1.0, 2.0]))
    metric.reset()
    assert torch.isnan(metric.compute()["var"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        metric = RunningMoments()
        for i, b in enumerate(batches(3)):
            if i % world == rank:  # uneven shards: rank 0 gets 3 batches of 1+100+250 values
                metric.update(b)
        result = {k: v.item() for k, v in metric.compute().items()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_sync_equals_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = RunningMoments()
    for b in batches(3):
        single.update(b)
    want = {k: v.item() for k, v in single.compute().items()}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-12), (rank, key)
