"""The gradient-variance estimator against exact enumeration, its metric, and the option end to end.

The exact answer is E over every ordered triple of strings (one prompt's K = 3 samples) of the
within-group total variance sum_j ||g_j - g_bar||^2 / (K - 1) of the per-sample gradients, each g_j
written out from the tabular model's own log-probabilities (docs/estimators.md §4-5, §10), not
from the code under test.
"""

import csv
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from distributed import free_port, gloo_group
from tabular_lm import TabularLM

from {{ cookiecutter.package_name }}.kl.estimators import kl_to_go
from {{ cookiecutter.package_name }}.kl.grad_variance import (
    contrast_generator,
    prompt_grad_variance,
    unit_contrasts,
    update_parts,
)
from {{ cookiecutter.package_name }}.kl.objective import Objective, rloo_kl_loss
from {{ cookiecutter.package_name }}.kl.token_stats import masked_token_stats
from {{ cookiecutter.package_name }}.training.metrics import GRAD_VAR_PARTS, RATIOS, GradVarianceStats, grad_var_key

VOCAB, MAX_LEN, BETA, K = 3, 3, 1.0, 3
GROUPS = 200  # sampled prompt groups for the estimator's mean


def reward_of(tokens, mask):
    return ((tokens == 2) & mask).sum(-1).double() - 0.5 * mask.sum(-1).double()


def models():
    p = TabularLM.random(VOCAB, MAX_LEN, seed=5)
    q = TabularLM.random(VOCAB, MAX_LEN, seed=6)
    p.table.requires_grad_(True)
    return p, q


def per_sample_gradients(p, q, tokens, mask):
    """{part: [N, *table]} each sample's gradient, from the formulas of docs/estimators.md §5.

    Sample i's surrogate reads only its own logits (the other samples' terms are constants), so
    one backward to the logits gives every sample's gradient, added into the table's rows.
    """
    logits = p.logits(tokens).detach().requires_grad_(True)  # [N, T, V]
    logp_all = torch.log_softmax(logits, -1)
    logq_all = torch.log_softmax(q.logits(tokens), -1).detach()
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask  # [N, T]
    d = (logp - logq_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask).detach()
    kl_t = (logp_all.exp() * (logp_all - logq_all)).sum(-1) * mask  # [N, T], differentiable

    def others(x):  # the mean over the other K - 1 samples of the group
        g = x.reshape(-1, K, *x.shape[1:])
        return ((g.sum(1, keepdim=True) - g) / (K - 1)).reshape(x.shape)

    rewards = reward_of(tokens, mask)
    mc_weight = d.sum(-1) - others(d.sum(-1))  # [N]
    rb_weight = kl_to_go(kl_t.detach()) - others(kl_to_go(kl_t.detach()))  # [N, T]
    seq_logp = logp.sum(-1)
    surrogates = {
        "reward": -(rewards - others(rewards)) * seq_logp,
        "kl_mc": BETA * mc_weight * seq_logp,
        "kl_rb": BETA * (kl_t.sum(-1) + (rb_weight * logp).sum(-1)),
    }
    rows = p.prefix_ids(tokens).unsqueeze(-1).expand(-1, -1, VOCAB)  # [N, T, V] table row of each logit
    grads = {}
    for name, s in surrogates.items():
        (by_logit,) = torch.autograd.grad(s.sum(), logits, retain_graph=True)
        grads[name] = torch.zeros(len(s), *p.table.shape, dtype=s.dtype).scatter_add_(1, rows, by_logit)
    return grads


def within_group_variance(g):
    """[N, ...] per-sample gradients in groups of K -> [N / K] sum_j ||g_j - g_bar||^2 / (K - 1)."""
    grouped = g.reshape(-1, K, g[0].numel())
    return (grouped - grouped.mean(1, keepdim=True)).square().sum((1, 2)) / (K - 1)


@pytest.fixture(scope="module")
def exact():
    """{part: E[s2]} over every ordered triple of strings, weighted by p(y1) p(y2) p(y3)."""
    p, q = models()
    strings, string_mask = p.strings()
    index = torch.cartesian_prod(*[torch.arange(len(strings))] * K).flatten()
    tokens, mask = strings[index], string_mask[index]
    with torch.no_grad():
        weight = p.log_prob(tokens, mask).reshape(-1, K).sum(1).exp()  # [S^3]
    g = per_sample_gradients(p, q, tokens, mask)
    g["total_mc"], g["total_rb"] = g["reward"] + g["kl_mc"], g["reward"] + g["kl_rb"]
    return {name: (weight * within_group_variance(g[name])).sum().item() for name in GRAD_VAR_PARTS}


@pytest.fixture(scope="module")
def sampled_groups():
    """GROUPS prompt groups of K samples from p: each part's per-sample surrogates [K], graphs kept."""
    p, q = models()
    generator = torch.Generator().manual_seed(0)
    groups = []
    for _ in range(GROUPS):
        tokens, mask = p.sample(K, generator)
        stats = masked_token_stats(p.logits(tokens), q.logits(tokens), tokens, mask, kl_grad=True)
        groups.append(update_parts(stats, mask, reward_of(tokens, mask), K, BETA))
    return p.table, groups


def estimates(sampled_groups, contrasts_of, drop_kl=False):
    """[GROUPS, 5] per-group estimates; contrasts_of(generator) -> [r, K] coefficients."""
    table, groups = sampled_groups
    generator = torch.Generator().manual_seed(1)
    rows = []
    for parts in groups:
        if drop_kl:
            parts = {**parts, "kl_mc": 0 * parts["kl_mc"], "kl_rb": 0 * parts["kl_rb"]}
        rows.append(prompt_grad_variance(parts, [table], contrasts_of(generator)))
    return torch.stack(rows).numpy()


def passes(z):
    """The check: every part's mean within 4 standard errors of the exact answer."""
    return all(abs(v) < 4 for v in z.values())


def z_scores(values, exact):
    mean, sem = values.mean(0), values.std(0, ddof=1) / np.sqrt(len(values))
    # A part dropped to zero has no spread: an infinite z, as it should be.
    with np.errstate(divide="ignore"):
        return {name: (mean[i] - exact[name]) / sem[i] for i, name in enumerate(GRAD_VAR_PARTS)}


def test_the_parts_add_up_to_the_loss_that_trains():
    # reward + kl_rb (kl_mc) is the per-sample loss of the default objective with that gradient.
    p, q = models()
    tokens, mask = p.sample(4 * K, torch.Generator().manual_seed(1))
    stats = masked_token_stats(p.logits(tokens), q.logits(tokens), tokens, mask, kl_grad=True)
    rewards = reward_of(tokens, mask)
    parts = update_parts(stats, mask, rewards, K, BETA)
    for gradient in ("mc", "rb"):
        loss = rloo_kl_loss(stats, mask, rewards, K, Objective(BETA, kl_gradient=gradient)).per_sample
        ours = parts["reward"] + parts[f"kl_{gradient}"]
        for i in range(len(loss)):
            want = torch.autograd.grad(loss[i], p.table, retain_graph=True)[0]
            got = torch.autograd.grad(ours[i], p.table, retain_graph=True)[0]
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_estimate_is_unbiased_for_each_part(exact, sampled_groups):
    # One random contrast per group (K - 1 of them are exact: the next test).
    z = z_scores(estimates(sampled_groups, lambda g: unit_contrasts(K, 1, g)), exact)
    assert passes(z), z
    assert exact["kl_mc"] > 2 * exact["kl_rb"] > 0, "the tabular pair must tell the two KL gradients apart"


def test_k_minus_one_contrasts_give_each_group_its_variance_exactly():
    p, q = models()
    tokens, mask = p.sample(K, torch.Generator().manual_seed(2))
    g = per_sample_gradients(p, q, tokens, mask)
    stats = masked_token_stats(p.logits(tokens), q.logits(tokens), tokens, mask, kl_grad=True)
    parts = update_parts(stats, mask, reward_of(tokens, mask), K, BETA)
    got = prompt_grad_variance(parts, [p.table], unit_contrasts(K, K - 1, torch.Generator().manual_seed(3)))
    g["total_mc"], g["total_rb"] = g["reward"] + g["kl_mc"], g["reward"] + g["kl_rb"]
    want = torch.stack([within_group_variance(g[name])[0] for name in GRAD_VAR_PARTS])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_same_coefficient_for_every_sample_is_rejected(exact, sampled_groups):
    # sum_j g_j instead of a contrast: the squared norm of the group's mean, not its spread.
    z = z_scores(estimates(sampled_groups, lambda g: torch.ones(1, K, dtype=torch.float64) / K**0.5), exact)
    assert not passes(z), z


def test_independent_signs_per_sample_are_rejected(exact, sampled_groups):
    # Uncentred coefficients estimate sum_j ||g_j||^2, a second moment: biased by ||g_bar||^2.
    def signs(g):
        return (torch.randint(0, 2, (1, K), generator=g) * 2 - 1).double() * ((K - 1) / K) ** 0.5

    z = z_scores(estimates(sampled_groups, signs), exact)
    assert not passes(z), z


def test_a_total_that_drops_the_kl_part_is_rejected(exact, sampled_groups):
    z = z_scores(estimates(sampled_groups, lambda g: unit_contrasts(K, 1, g), drop_kl=True), exact)
    assert not passes(z) and abs(z["total_mc"]) > 4, z


def test_the_metric_reports_means_ratios_and_their_delta_method_errors():
    x = np.random.default_rng(0).gamma(2.0, 1.0, size=(50, 5)) + np.array([3.0, 1.0, 10.0, 14.0, 11.0])
    metric = GradVarianceStats()
    metric.update(torch.tensor(x[:20]))
    metric.update(torch.tensor(x[20:]))
    got = {k: v.item() for k, v in metric.compute().items()}
    col = {name: i for i, name in enumerate(GRAD_VAR_PARTS)}
    n, mean, cov = len(x), x.mean(0), np.cov(x.T, ddof=1) / len(x)
    for name, i in col.items():
        assert got[name] == pytest.approx(mean[i], rel=1e-12)
        assert got[f"{name}_sem"] == pytest.approx(x[:, i].std(ddof=1) / np.sqrt(n), rel=1e-10)
    for name, (a, b) in {"kl_mc_over_kl_rb": (0, 1), "kl_share_mc": (0, 3), "kl_share_rb": (1, 4)}.items():
        gradient = np.zeros(5)
        gradient[a], gradient[b] = 1 / mean[b], -mean[a] / mean[b] ** 2
        assert got[name] == pytest.approx(mean[a] / mean[b], rel=1e-12)
        assert got[f"{name}_sem"] == pytest.approx(np.sqrt(gradient @ cov @ gradient), rel=1e-9)


def _prompt_rows(prompts):
    """Each named prompt's [5] estimate, its samples and contrasts fixed by its name."""
    p, q = models()
    rows = []
    for name in prompts:
        g = contrast_generator(7, name)
        tokens, mask = p.sample(K, g)
        stats = masked_token_stats(p.logits(tokens), q.logits(tokens), tokens, mask, kl_grad=True)
        parts = update_parts(stats, mask, reward_of(tokens, mask), K, BETA)
        rows.append(prompt_grad_variance(parts, [p.table], unit_contrasts(K, 1, g)))
    return torch.stack(rows)


PROMPTS = [f"prompt {i}" for i in range(7)]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:

    with gloo_group(rank, world, port):
        metric = GradVarianceStats()
        metric.update(_prompt_rows(PROMPTS[rank::world]))  # uneven shards
        torch.save({k: v.item() for k, v in metric.compute().items()}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_processes_give_one_process_on_the_union_of_prompts(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = GradVarianceStats()
    single.update(_prompt_rows(PROMPTS))
    want = {k: v.item() for k, v in single.compute().items()}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-10), (rank, key)


@pytest.mark.slow
def test_train_py_logs_the_gradient_variances_with_the_option_on(tmp_path):
    from conftest import PROJECT, run_script  # here: the DDP workers import this file, and need torch only

    result = run_script(
        "train.py",
        "fit",
        "--config",
        str(PROJECT / "configs/default.yaml"),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--data.batch_size=2",
        "--model.init_args.sampling.max_new_tokens=4",
        "--model.init_args.sampling.val_samples_per_prompt=3",
        "--model.init_args.updates.track_grad_variance=true",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = {key for row in rows for key, value in row.items() if value}
    wanted = {grad_var_key("val", name) for name in (*GRAD_VAR_PARTS, *RATIOS)}
    assert wanted | {f"{key}_sem" for key in wanted} <= logged
    assert not {key for key in logged if key.startswith("train/grad_var")}, "measured at validation only"


def test_without_the_option_nothing_is_measured(tiny_trainer):
    # Imported here, as conftest is above: the DDP workers import this file and need torch only.
    from {{ cookiecutter.package_name }}.training.data import PromptDataModule
    from {{ cookiecutter.package_name }}.training.module import RBKLModule
    from {{ cookiecutter.package_name }}.training.options import Sampling

    module = RBKLModule(sampling=Sampling(max_new_tokens=4, val_samples_per_prompt=3))
    assert module.grad_variance is None
    trainer = tiny_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, PromptDataModule(batch_size=2, epoch_repeats=1))
    assert "val/kl/rb/mean" in trainer.callback_metrics
    assert not [key for key in trainer.callback_metrics if "/grad_var/" in key]


def test_compare_runs_and_the_sweep_summary_report_the_ratios_per_run_and_grid_point(tmp_path):
    from matplotlib.image import imread

    from {{ cookiecutter.package_name }}.reports.compare_runs import compare, grid_point_grad_variance
    from {{ cookiecutter.package_name }}.reports.plots import gradient_variance

    ratio, share = grad_var_key("val", "kl_mc_over_kl_rb"), grad_var_key("val", "kl_share_rb")
    runs = []
    for name, ratios in (("a", (4.0, 8.0)), ("b", (2.0, 4.0)), ("c", (3.0, 3.0))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "metrics.csv").write_text(
            f"epoch,step,val/kl/rb/mean,val/reward/mean,{ratio},{share}\n"
            f"0,9,0.1,0.2,{ratios[0]},0.5\n1,19,0.2,0.3,{ratios[1]},nan\n"
        )
        runs.append(folder)
    points = compare(runs, tmp_path / "out")["runs"]
    # Each run: the mean over its validations (a NaN validation left out).
    assert [p["grad_var/kl_mc_over_kl_rb"] for p in points] == [6.0, 3.0, 3.0]
    assert points[0]["grad_var/kl_share_rb"] == 0.5
    row = grid_point_grad_variance(points)["grad_var/kl_mc_over_kl_rb"]
    assert row["mean"] == pytest.approx(4.0) and row["seeds"] == 3
    assert row["ci95"][0] < 4.0 < row["ci95"][1]

    history = [
        {"epoch": float(e), **{grad_var_key("val", n): 1.0 + e for n in (*GRAD_VAR_PARTS, *RATIOS)}} for e in range(3)
    ]
    figure = gradient_variance(history)
    assert all(ax.has_data() for ax in figure.axes) and len(figure.axes) == 2
    figure.savefig(tmp_path / "grad_variance.png")
    assert imread(tmp_path / "grad_variance.png").shape == (480, 1280, 4)
