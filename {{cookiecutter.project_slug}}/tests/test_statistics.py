"""The estimator study's statistics against exact answers, by enumerating tiny models.

Each "prompt" is a pair of tabular models (p_i, q_i) whose every string is enumerated, so the
exact KL_i and the exact within-prompt variance of each estimator are known without the
project's code. Draws from those distributions then exercise the statistics code many times
(docs/estimators.md §7): unbiasedness of the cross-fitted control variate, the coverage of both
95% intervals of their own targets, and the variance ratio.
"""

import math

import numpy as np
import torch
from tabular_lm import TabularLM, exact_kl, exact_mean_var

from {{ cookiecutter.package_name }}.kl.estimators import all_kl_values, cross_fitted_alpha
from {{ cookiecutter.package_name }}.kl.token_stats import masked_token_stats
from {{ cookiecutter.package_name }}.reports.kl_report import interval
from {{ cookiecutter.package_name }}.training.metrics import PromptGroupedStats

VOCAB, MAX_LEN = 4, 4


def prompt_pair(i: int) -> tuple[TabularLM, TabularLM]:
    return TabularLM.random(VOCAB, MAX_LEN, seed=100 + i), TabularLM.random(VOCAB, MAX_LEN, seed=200 + i)


def naive_values(p: TabularLM, q: TabularLM, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """mc and rb per string, written out with full log-softmaxes (not the project's code)."""
    logp_all, logq_all = torch.log_softmax(p.logits(tokens), -1), torch.log_softmax(q.logits(tokens), -1)
    idx = tokens.unsqueeze(-1)
    d = (logp_all.gather(-1, idx) - logq_all.gather(-1, idx)).squeeze(-1) * mask
    kl_t = (logp_all.exp() * (logp_all - logq_all)).sum(-1) * mask
    return {"mc": d.sum(-1), "rb": kl_t.sum(-1)}


class Population:
    """Prompts with exact KL and exact within-prompt variances, and pools of sampled values."""

    def __init__(self, prompts: int, pool: int, seed: int):
        self.pairs = [prompt_pair(i) for i in range(prompts)]
        self.kl = np.array([exact_kl(p, q).item() for p, q in self.pairs])
        self.var = {name: [] for name in ("mc", "rb")}
        self.pools = {name: [] for name in ("mc", "rb")}
        gen = torch.Generator().manual_seed(seed)
        for p, q in self.pairs:
            strings, smask = p.strings()
            for name, values in naive_values(p, q, strings, smask).items():
                self.var[name].append(exact_mean_var(p, values)[1])
            tokens, mask = p.sample(pool, gen)
            for name, values in naive_values(p, q, tokens, mask).items():
                self.pools[name].append(values.numpy())
        self.cursor = [0] * prompts

    def draw(self, prompt: int, m: int) -> dict[str, np.ndarray]:
        start = self.cursor[prompt]
        self.cursor[prompt] += m
        return {name: pool[prompt][start : start + m] for name, pool in self.pools.items()}


def coverage_tolerance(replications: int) -> float:
    return 4 * math.sqrt(0.95 * 0.05 / replications)


def test_ci95_within_covers_the_prompt_sets_kl():
    n, m, reps = 8, 16, 400
    pop = Population(n, reps * m, seed=0)
    target = pop.kl.mean()  # the KL of THIS prompt set
    for name in ("rb", "mc"):
        pop.cursor = [0] * n
        covered = 0
        for _ in range(reps):
            metric = PromptGroupedStats()
            metric.update(torch.from_numpy(np.concatenate([pop.draw(i, m)[name] for i in range(n)])), m)
            s = metric.compute()
            lo, hi = interval(s["mean"].item(), s["sem_within"].item())
            covered += lo <= target <= hi
        assert abs(covered / reps - 0.95) < coverage_tolerance(reps), (name, covered / reps)


def test_ci95_covers_the_population_kl_with_prompts_redrawn():
    population, n, m, reps = 24, 8, 16, 400
    pop = Population(population, reps * m * 3, seed=1)
    target = pop.kl.mean()  # the KL over the population of prompts
    rng = np.random.default_rng(0)
    covered = {"rb": 0, "mc": 0}
    for _ in range(reps):
        chosen = rng.integers(0, population, size=n)
        draws = [pop.draw(int(i), m) for i in chosen]
        for name in covered:
            metric = PromptGroupedStats()
            metric.update(torch.from_numpy(np.concatenate([d[name] for d in draws])), m)
            s = metric.compute()
            lo, hi = interval(s["mean"].item(), s["sem_prompts"].item(), df=n - 1)
            covered[name] += lo <= target <= hi
    for name, count in covered.items():
        assert abs(count / reps - 0.95) < coverage_tolerance(reps), (name, count / reps)


def test_within_prompt_variance_ratio_matches_the_exact_ratio():
    n, m, reps = 8, 16, 200
    pop = Population(n, reps * m, seed=2)
    exact = np.mean(pop.var["mc"]) / np.mean(pop.var["rb"])
    metrics = {"mc": PromptGroupedStats(), "rb": PromptGroupedStats()}
    s2 = {"mc": [], "rb": []}
    for _ in range(reps):
        draws = [pop.draw(i, m) for i in range(n)]
        for name, metric in metrics.items():
            values = np.concatenate([d[name] for d in draws])
            metric.update(torch.from_numpy(values), m)
            s2[name] += [d[name].var(ddof=1) for d in draws]
    ratio = metrics["mc"].compute()["within_prompt_var"].item() / metrics["rb"].compute()["within_prompt_var"].item()
    # Delta method for a ratio of means over G groups: var = var(a - r b) / (G mean(b)^2).
    a, b = np.array(s2["mc"]), np.array(s2["rb"])
    se = np.sqrt((a - ratio * b).var(ddof=1) / (len(a) * b.mean() ** 2))
    assert abs(ratio - exact) < 4 * se, (ratio, exact, se)
    assert exact > 1.5, "a pair where RB's within-prompt variance is clearly lower, so the check says something"


def test_cross_fitted_cv_is_unbiased_and_an_in_sample_fit_is_not():
    n, k, reps = 4, 4, 4000
    pairs = [prompt_pair(10 + i) for i in range(n)]
    exact = np.array([exact_kl(p, q).item() for p, q in pairs])
    gen = torch.Generator().manual_seed(3)
    f = []  # [n, reps * k] sequence log-ratios
    for p, q in pairs:
        tokens, mask = p.sample(reps * k, gen)
        f.append(naive_values(p, q, tokens, mask)["mc"])
    f = torch.stack(f).reshape(n, reps, k).transpose(0, 1).reshape(reps, n * k)  # one batch per row
    g = torch.expm1(-f)
    crossfit, in_sample = [], []
    for fr, gr in zip(f, g, strict=True):
        crossfit.append(fr + cross_fitted_alpha(fr, gr, k) * gr)
        fc, gc = fr - fr.mean(), gr - gr.mean()
        in_sample.append(fr - (fc * gc).sum() / gc.square().sum() * gr)  # alpha* fitted on these samples
    for estimates, unbiased in ((crossfit, True), (in_sample, False)):
        per_prompt = torch.stack(estimates).reshape(reps, n, k).mean(2).numpy()  # [reps, n]
        z = (per_prompt.mean(0) - exact) / (per_prompt.std(0, ddof=1) / math.sqrt(reps))
        if unbiased:
            assert np.all(np.abs(z) < 4), z
        else:
            assert np.abs(z).max() > 6, z


def test_logged_cv_opt_is_the_cross_fitted_control_variate():
    p, q = prompt_pair(0)
    tokens, mask = p.sample(12, torch.Generator().manual_seed(4))
    stats = masked_token_stats(p.logits(tokens), q.logits(tokens), tokens, mask, kl_grad=False)
    values = all_kl_values(stats, mask, group_size=3)
    f = values["mc"]
    g = torch.expm1(-f)
    torch.testing.assert_close(values["cv_opt"], f + cross_fitted_alpha(f, g, 3) * g)
    alone = all_kl_values(stats, mask, group_size=12)["cv_opt"]  # one prompt: nothing to fit on
    torch.testing.assert_close(alone, f)
