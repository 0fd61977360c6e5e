"""The gradient-variance estimators against exact enumeration, their metric, and the options end to end.

The exact answers, each g_j written out from the tabular model's own log-probabilities
(docs/estimators.md §4-5, §10), not from the code under test:
  spread       E over every ordered triple of strings (one prompt's K = 3 samples) of the within-group
               sum_j ||g_j - g_bar||^2 / (K - 1), leave-one-out baselines in g_j
  update       K tr Var(G) with G = g_bar, the same triples' mean update: K (E ||G||^2 - ||E G||^2)
  no_baseline  tr Var(g) over single strings, g without baselines
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
    difference_contrast,
    joined,
    prompt_grad_variance,
    unit_contrasts,
    update_parts,
)
from {{ cookiecutter.package_name }}.kl.objective import Objective, rloo_kl_loss
from {{ cookiecutter.package_name }}.kl.token_stats import TokenStats, astuple_shallow, masked_token_stats
from {{ cookiecutter.package_name }}.training.grad_probe import grad_variance_due
from {{ cookiecutter.package_name }}.training.metrics import GRAD_VAR_PARTS, RATIOS, GradVarianceStats, grad_var_key

VOCAB, MAX_LEN, BETA, K = 3, 3, 1.0, 3
GROUPS = 200  # sampled prompt groups for the estimator's mean
# The update's variance: pairs of groups of KP samples, where the baselines correlate the samples
# most (tr Cov ~ 1 / (k - 1)^2), so that the within-group spread misses it by many standard errors.
KP = 2
PAIRS = 400


def reward_of(tokens, mask):
    return ((tokens == 2) & mask).sum(-1).double() - 0.5 * mask.sum(-1).double()


def models():
    p = TabularLM.random(VOCAB, MAX_LEN, seed=5)
    q = TabularLM.random(VOCAB, MAX_LEN, seed=6)
    p.table.requires_grad_(True)
    return p, q


def per_sample_gradients(p, q, tokens, mask, group_size=K):
    """{part: [N, *table]} each sample's gradient, from the formulas of docs/estimators.md §5, with
    leave-one-out baselines over groups of `group_size` adjacent samples (None: no baselines).

    Sample i's surrogate reads only its own logits (the other samples' terms are constants), so
    one backward to the logits gives every sample's gradient, added into the table's rows.
    """
    logits = p.logits(tokens).detach().requires_grad_(True)  # [N, T, V]
    logp_all = torch.log_softmax(logits, -1)
    logq_all = torch.log_softmax(q.logits(tokens), -1).detach()
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask  # [N, T]
    d = (logp - logq_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask).detach()
    kl_t = (logp_all.exp() * (logp_all - logq_all)).sum(-1) * mask  # [N, T], differentiable

    def others(x):  # the mean over the other k - 1 samples of the group
        if group_size is None:
            return torch.zeros_like(x)
        g = x.reshape(-1, group_size, *x.shape[1:])
        return ((g.sum(1, keepdim=True) - g) / (group_size - 1)).reshape(x.shape)

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


def test_with_engine_weights_the_parts_add_up_to_the_weighted_loss():
    # Samples from a proposal mu != p, weighted as sampling.engine_correction weighs the loss.
    from {{ cookiecutter.package_name }}.kl.correction import ImportanceWeights

    p, q = models()
    tokens, mask = p.sample(4 * K, torch.Generator().manual_seed(1))
    stats = masked_token_stats(p.logits(tokens), q.logits(tokens), tokens, mask, kl_grad=True)
    engine_logp = stats.logp.detach() + 0.3 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))
    weights = ImportanceWeights.of(stats.logp, engine_logp.masked_fill(~mask, 0.0), mask)
    rewards = reward_of(tokens, mask)
    parts = update_parts(stats, mask, rewards, K, BETA, weights)
    for gradient in ("mc", "rb"):
        objective = Objective(BETA, kl_gradient=gradient)
        loss = rloo_kl_loss(stats, mask, rewards, K, objective, weights=weights).per_sample.sum()
        want = torch.autograd.grad(loss, p.table, retain_graph=True)[0]
        got = torch.autograd.grad((parts["reward"] + parts[f"kl_{gradient}"]).sum(), p.table, retain_graph=True)[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    unweighted = update_parts(stats, mask, rewards, K, BETA)
    assert not torch.allclose(parts["kl_rb"], unweighted["kl_rb"])


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


def with_totals(g):
    return {**g, "total_mc": g["reward"] + g["kl_mc"], "total_rb": g["reward"] + g["kl_rb"]}


@pytest.fixture(scope="module")
def exact_update_and_no_baseline():
    """{quantity: {part: exact value}}: KP tr Var(G) over every ordered KP-tuple, tr Var(g) without baselines."""
    p, q = models()
    strings, string_mask = p.strings()
    with torch.no_grad():
        single = p.log_prob(strings, string_mask).exp()  # [S]
    index = torch.cartesian_prod(*[torch.arange(len(strings))] * KP).flatten()
    weight = single[index].reshape(-1, KP).prod(1)  # [S^KP]
    g = with_totals(per_sample_gradients(p, q, strings[index], string_mask[index], KP))
    bare = with_totals(per_sample_gradients(p, q, strings, string_mask, group_size=None))

    def variance(w, x):  # sum_i w_i ||x_i - E x||^2 for x [S, ...]
        flat = x.reshape(len(x), -1)
        return (w @ (flat - (w @ flat)).square().sum(1)).item()

    return {
        "update": {name: KP * variance(weight, g[name].reshape(-1, KP, *g[name].shape[1:]).mean(1)) for name in g},
        "no_baseline": {name: variance(single, bare[name]) for name in bare},
    }


@pytest.fixture(scope="module")
def sampled_pairs():
    """PAIRS pairs of independent KP-sample groups of one prompt: per group, the parts with
    leave-one-out baselines and without; and the 2KP samples' parts with baselines over all 2KP."""
    p, q = models()
    tokens, mask = p.sample(PAIRS * 2 * KP, torch.Generator().manual_seed(4))
    rewards = reward_of(tokens, mask)
    pairs = []
    for start in range(0, len(tokens), 2 * KP):
        rows = slice(start, start + 2 * KP)  # a graph per pair: each backward stays small
        t, m, r = tokens[rows], mask[rows], rewards[rows]
        both = masked_token_stats(p.logits(t), q.logits(t), t, m, kl_grad=True)
        halves = [slice(0, KP), slice(KP, 2 * KP)]
        stats = [TokenStats(*(field[h] for field in astuple_shallow(both))) for h in halves]
        pairs.append(
            {
                "baselines": [update_parts(st, m[h], r[h], KP, BETA) for st, h in zip(stats, halves, strict=True)],
                "bare": [update_parts(st, m[h], r[h], None, BETA) for st, h in zip(stats, halves, strict=True)],
                "baselines_over_2k": update_parts(both, m, r, 2 * KP, BETA),
            }
        )
    return p.table, pairs


def pair_estimates(sampled_pairs, parts_of, contrasts_of):
    """[GROUPS, 5]: prompt_grad_variance of parts_of(pair) with contrasts_of(generator)."""
    table, pairs = sampled_pairs
    generator = torch.Generator().manual_seed(5)
    return torch.stack(
        [prompt_grad_variance(parts_of(pair), [table], contrasts_of(generator)) for pair in pairs]
    ).numpy()


def spread_estimates(sampled_pairs):
    """[PAIRS, 5]: the mean of the two groups' spread estimates (with baselines), as the probe logs `spread`."""
    table, pairs = sampled_pairs
    generator = torch.Generator().manual_seed(5)
    rows = []
    for pair in pairs:
        spreads = [
            prompt_grad_variance(parts, [table], unit_contrasts(KP, 1, generator)) for parts in pair["baselines"]
        ]
        rows.append(torch.stack(spreads).mean(0))
    return torch.stack(rows).numpy()


def test_the_update_variance_from_two_groups_is_unbiased(exact_update_and_no_baseline, sampled_pairs):
    exact = exact_update_and_no_baseline["update"]
    z = z_scores(
        pair_estimates(sampled_pairs, lambda pair: joined(*pair["baselines"]), lambda g: difference_contrast(KP)), exact
    )
    assert passes(z), z


def test_the_within_group_spread_taken_for_the_update_variance_is_rejected(exact_update_and_no_baseline, sampled_pairs):
    # Each group alone (its spread, both groups' averaged) misses the (k - 1) tr Cov that the
    # leave-one-out baselines put between the samples of a group.
    spread = spread_estimates(sampled_pairs)
    z = z_scores(spread, exact_update_and_no_baseline["update"])
    assert not passes(z) and z["kl_rb"] < -4, z  # the spread is the smaller: tr Cov > 0


def test_two_groups_sharing_their_baselines_are_rejected(exact_update_and_no_baseline, sampled_pairs):
    # Baselines over all 2KP samples: the halves are no longer independent updates of size KP.
    exact = exact_update_and_no_baseline["update"]
    z = z_scores(
        pair_estimates(sampled_pairs, lambda pair: pair["baselines_over_2k"], lambda g: difference_contrast(KP)), exact
    )
    assert not passes(z), z


def test_the_variance_without_baselines_is_unbiased(exact_update_and_no_baseline, sampled_pairs):
    exact = exact_update_and_no_baseline["no_baseline"]
    z = z_scores(
        pair_estimates(sampled_pairs, lambda pair: joined(*pair["bare"]), lambda g: unit_contrasts(2 * KP, 1, g)), exact
    )
    assert passes(z), z


def test_baselines_left_in_are_rejected_for_the_variance_without_them(exact_update_and_no_baseline, sampled_pairs):
    spread = spread_estimates(sampled_pairs)
    z = z_scores(spread, exact_update_and_no_baseline["no_baseline"])
    assert not passes(z), z


def test_the_difference_contrast_is_a_unit_vector_between_the_two_group_means():
    c = difference_contrast(4)
    assert c.shape == (1, 8) and c.norm().item() == pytest.approx(1.0)
    assert c[0, :4].sum().item() == pytest.approx(-c[0, 4:].sum().item()) == pytest.approx((4 / 2) ** 0.5)


def test_the_training_measurement_is_due_once_per_multiple_of_n_steps():
    assert [grad_variance_due(step, 1, 5) for step in range(11)] == [s % 5 == 0 for s in range(11)]
    # Four updates per batch: the batch whose steps hold a multiple of N.
    assert [grad_variance_due(first, 4, 10) for first in range(0, 24, 4)] == [True, False, True, False, False, True]


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
    ratios = {
        "kl_mc_over_kl_rb": (0, 1),
        "kl_share_mc": (0, 3),
        "kl_share_rb": (1, 4),
        "total_mc_over_total_rb": (3, 4),
    }
    for name, (a, b) in ratios.items():
        gradient = np.zeros(5)
        gradient[a], gradient[b] = 1 / mean[b], -mean[a] / mean[b] ** 2
        assert got[name] == pytest.approx(mean[a] / mean[b], rel=1e-12)
        assert got[f"{name}_sem"] == pytest.approx(np.sqrt(gradient @ cov @ gradient), rel=1e-9)
    # The cross term total - reward - kl (2 tr Cov of the two parts) and its share of the total.
    for name, (total, kl) in {"cross_mc": (3, 0), "cross_rb": (4, 1)}.items():
        w = np.zeros(5)
        w[total], w[2], w[kl] = 1.0, -1.0, -1.0
        assert got[name] == pytest.approx(w @ mean, rel=1e-12)
        assert got[f"{name}_sem"] == pytest.approx((x @ w).std(ddof=1) / np.sqrt(n), rel=1e-9)
        share = (w @ mean) / mean[total]
        d = w - share * np.eye(5)[total]
        assert got[f"cross_share_{name[-2:]}"] == pytest.approx(share, rel=1e-12)
        assert got[f"cross_share_{name[-2:]}_sem"] == pytest.approx(np.sqrt(d @ cov @ d) / mean[total], rel=1e-9)


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
    wanted = {grad_var_key("val", "spread", name) for name in (*GRAD_VAR_PARTS, *RATIOS)}
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

    ratio, share = grad_var_key("val", "spread", "kl_mc_over_kl_rb"), grad_var_key("val", "spread", "kl_share_rb")
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
    assert [p[ratio] for p in points] == [6.0, 3.0, 3.0]
    assert points[0][share] == 0.5
    row = grid_point_grad_variance(points)[ratio]
    assert row["mean"] == pytest.approx(4.0) and row["seeds"] == 3
    assert row["ci95"][0] < 4.0 < row["ci95"][1]

    history = [
        {"epoch": float(e), **{grad_var_key("val", "spread", n): 1.0 + e for n in (*GRAD_VAR_PARTS, *RATIOS)}}
        for e in range(3)
    ]
    figure = gradient_variance(history)
    assert all(ax.has_data() for ax in figure.axes) and len(figure.axes) == 2
    figure.savefig(tmp_path / "grad_variance.png")
    assert imread(tmp_path / "grad_variance.png").shape == (480, 1280, 4)


def test_a_run_s_ratios_leave_out_the_probe_where_the_policy_is_its_reference():
    from {{ cookiecutter.package_name }}.reports.compare_runs import run_grad_variance

    def key(name):
        return grad_var_key("train", "update", name)

    header = ["step", key("kl_mc"), key("kl_rb"), key("kl_share_mc"), key("kl_mc_over_kl_rb")]
    rows = [
        dict(zip(header, values, strict=True))
        for values in (
            ("0", "0.0", "0.0", "0.0", "nan"),  # step 0: policy == reference, both KL parts exactly zero
            ("20", "4.0", "0.5", "0.2", "8.0"),
            ("40", "6.0", "1.5", "0.4", "4.0"),
        )
    ]
    averages = run_grad_variance(rows)
    assert averages[key("kl_share_mc")] == pytest.approx(0.3)  # 0.2 with the step-0 row kept
    assert averages[key("kl_mc_over_kl_rb")] == pytest.approx(6.0)
    # One KL part zero is a measurement, not the reference state: it stays.
    rows[0][key("kl_mc")] = "1.0"
    assert run_grad_variance(rows)[key("kl_share_mc")] == pytest.approx(0.2)


def test_training_logs_the_three_quantities_every_n_steps_and_leaves_training_alone(tiny_trainer, tmp_path):
    from conftest import Characters
    from lightning.pytorch.loggers import CSVLogger

    from {{ cookiecutter.package_name }}.training.data import PromptDataModule
    from {{ cookiecutter.package_name }}.training.module import RBKLModule
    from {{ cookiecutter.package_name }}.training.options import Sampling, Updates

    rows = {}
    for every in (None, 2):
        torch.manual_seed(0)
        module = RBKLModule(
            reward=Characters(), sampling=Sampling(max_new_tokens=4), updates=Updates(grad_variance_every_n_steps=every)
        )
        logger = CSVLogger(tmp_path / str(every), name="run")
        trainer = tiny_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=logger)
        trainer.fit(module, PromptDataModule(batch_size=2, epoch_repeats=1))
        rows[every] = list(csv.DictReader(open(next((tmp_path / str(every)).rglob("metrics.csv")))))
    measured = [{k: v for k, v in row.items() if "/grad_var/" in k and v} for row in rows[2]]
    # Steps 0 and 2 of 0, 1, 2; each of the three quantities with its parts, ratios and errors.
    assert [bool(m) for m in measured] == [True, False, True], measured
    for quantity in ("spread", "update", "no_baseline"):
        for name in (*GRAD_VAR_PARTS, *RATIOS):
            assert grad_var_key("train", quantity, name) in measured[0]
            assert grad_var_key("train", quantity, f"{name}_sem") in measured[0]
    assert float(measured[0][grad_var_key("train", "update", "reward")]) > 0  # a reward that differs per sample
    # The second group comes from its own draws: training's samples, and so its columns, are unchanged.
    for off, on in zip(rows[None], rows[2], strict=True):
        assert off == {k: v for k, v in on.items() if k in off}
    assert not [k for k in rows[None][0] if "/grad_var/" in k]


def test_the_training_probe_composes_the_two_groups_as_documented():
    # With exact contrasts every quantity is a function of the two groups' per-sample gradients,
    # here one backward per sample and part on the tiny GPT-2.
    from conftest import Characters

    from {{ cookiecutter.package_name }}.training.module import RBKLModule
    from {{ cookiecutter.package_name }}.training.options import Sampling, Updates

    k = 3
    torch.manual_seed(0)
    module = RBKLModule(
        reward=Characters(),
        sampling=Sampling(samples_per_prompt=k, max_new_tokens=4),
        updates=Updates(grad_variance_every_n_steps=1, grad_variance_contrasts=None),
    )
    probe, prompts = module.grad_variance, ["the cat", "a dog"]
    first, second = module.rollout(prompts, k), module.rollout(prompts, k)
    got = probe.at_training_size(first, second, step=0)
    params = probe.trained_parameters()

    def gradients(group, baselines):  # {part: [k, P]}, one backward per sample and part
        stats = probe.stats(group.samples)
        parts = update_parts(stats, group.samples.response_mask, group.rewards, baselines, probe.beta)
        return {
            name: torch.stack(
                [
                    torch.cat([g.flatten() for g in torch.autograd.grad(v[j], params, retain_graph=True)])
                    for j in range(k)
                ]
            ).double()
            for name, v in with_totals(parts).items()
        }

    for i in range(len(prompts)):
        one, two = (r.select(torch.tensor([i])) for r in (first, second))
        g1, g2 = gradients(one, k), gradients(two, k)
        b1, b2 = gradients(one, None), gradients(two, None)
        for c, name in enumerate(GRAD_VAR_PARTS):
            s2 = [(g - g.mean(0)).square().sum() / (k - 1) for g in (g1[name], g2[name])]
            pooled = torch.cat([b1[name], b2[name]])
            want = {
                "spread": (s2[0] + s2[1]) / 2,
                "update": k / 2 * (g1[name].mean(0) - g2[name].mean(0)).square().sum(),
                "no_baseline": (pooled - pooled.mean(0)).square().sum() / (2 * k - 1),
            }
            for quantity, value in want.items():
                torch.testing.assert_close(got[quantity][i, c], value, rtol=1e-4, atol=1e-9)
