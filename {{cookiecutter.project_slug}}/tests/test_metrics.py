"""PromptGroupedStats: the statistics of docs/estimators.md §8 against numpy, merged exactly across ranks."""

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from distributed import free_port, gloo_group

from {{ cookiecutter.package_name }}.training.metrics import PromptGroupedStats, group_state, merge_states

# Uneven batches of prompt groups: (group sizes) per batch, sizes from 2 to 9.
BATCHES = [[2, 2, 2], [5], [9, 3, 4, 2], [7, 7], [3]]


def grouped(seed: int, sizes: list[list[int]], loc: float = 1e4) -> list[torch.Tensor]:
    """Values per batch: each prompt its own true mean, so pooling all values would be wrong."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch in sizes:
        parts = [
            loc
            + 5 * torch.randn((), generator=gen, dtype=torch.float64)
            + (1 + i) * torch.randn(k, generator=gen, dtype=torch.float64)
            for i, k in enumerate(batch)
        ]
        out.append(torch.cat(parts).float())
    return out


def numpy_reference(groups: list[np.ndarray]) -> dict[str, float]:
    """docs/estimators.md §8, written out with numpy."""
    n = len(groups)
    means = np.array([g.mean() for g in groups])
    s2 = np.array([g.var(ddof=1) for g in groups])
    sizes = np.array([len(g) for g in groups])
    values = np.concatenate(groups)
    return {
        "mean": means.mean(),
        "within_prompt_var": s2.mean(),
        "within_prompt_var_sem": s2.std(ddof=1) / np.sqrt(n),
        "sem_prompts": means.std(ddof=1) / np.sqrt(n),
        "sem_within": np.sqrt((s2 / sizes).sum()) / n,
        "neg_frac": (values < 0).mean(),
        "prompts": n,
        "samples": len(values),
    }


def split(values: torch.Tensor, sizes: list[int]) -> list[np.ndarray]:
    return [g.double().numpy() for g in torch.split(values, sizes)]


@pytest.mark.parametrize("loc", [1e4, 0.0, -3.0])
@pytest.mark.parametrize("sizes", [BATCHES, [[4, 4], [4, 4, 4], [4]]], ids=["unequal", "equal"])
def test_matches_numpy_float64_on_grouped_batches(loc, sizes):
    data = grouped(0, sizes, loc=loc)
    metric = PromptGroupedStats()
    groups = []
    for values, batch in zip(data, sizes, strict=True):
        metric.update(values, batch if len(set(batch)) > 1 else batch[0])
        groups += split(values, batch)
    got = metric.compute()
    for key, want in numpy_reference(groups).items():
        assert got[key].item() == pytest.approx(want, rel=1e-9, abs=1e-12), key


def test_pooling_would_give_another_variance():
    # The point of grouping: prompts with different true KLs make the pooled variance larger.
    values = grouped(1, [[8, 8, 8, 8]], loc=0.0)[0]
    metric = PromptGroupedStats()
    metric.update(values, 8)
    assert values.double().var().item() > 2 * metric.compute()["within_prompt_var"].item()


def test_merge_order_does_not_matter():
    parts = torch.stack([group_state(v, torch.tensor(s)) for v, s in zip(grouped(2, BATCHES), BATCHES, strict=True)])
    first = merge_states(parts)
    for seed in range(5):
        perm = torch.randperm(len(parts), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(merge_states(parts[perm]), first, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("count, sizes", [(7, 3), (6, 1), (6, [2, 1, 3]), (6, [2, 2])])
def test_groups_that_cannot_give_a_variance_are_refused(count, sizes):
    with pytest.raises(ValueError, match=">= 2"):
        PromptGroupedStats().update(torch.arange(float(count)), sizes)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_empty_metric_reports_nan_and_reset_clears():
    metric = PromptGroupedStats()
    assert torch.isnan(metric.compute()["mean"])
    metric.update(torch.tensor([1.0, 2.0]), 2)
    metric.reset()
    assert torch.isnan(metric.compute()["within_prompt_var"])


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:

    with gloo_group(rank, world, port):
        metric = PromptGroupedStats()
        for i, (values, sizes) in enumerate(zip(grouped(3, BATCHES), BATCHES, strict=True)):
            if i % world == rank:  # uneven shards; a prompt's samples stay on one rank
                metric.update(values, sizes)
        result = {k: v.item() for k, v in metric.compute().items()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_process_sync_equals_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = PromptGroupedStats()
    for values, sizes in zip(grouped(3, BATCHES), BATCHES, strict=True):
        single.update(values, sizes)
    want = {k: v.item() for k, v in single.compute().items()}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-12), (rank, key)
