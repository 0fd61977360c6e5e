"""The fused, chunked op equals the naive full-vocabulary formulas, values and gradients."""

import pytest
import torch

from {{ cookiecutter.package_name }}.kl.token_stats import token_stats


def naive(policy_logits, ref_logits, tokens):
    logp = torch.log_softmax(policy_logits, -1)
    logq = torch.log_softmax(ref_logits, -1)
    p = logp.exp()
    idx = tokens.unsqueeze(-1)
    return (
        logp.gather(-1, idx).squeeze(-1),
        logq.gather(-1, idx).squeeze(-1),
        (p * (logp - logq)).sum(-1),
        -(p * logp).sum(-1),
    )


TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_rows", [1, 3, 7, None])
def test_values_and_gradients_match_the_naive_formulas(dtype, chunk_rows):
    gen = torch.Generator().manual_seed(0)
    b, t, v = 3, 5, 11  # 15 rows: chunks of 3 and 7 do not divide them
    policy = (2 * torch.randn(b, t, v, generator=gen, dtype=dtype)).requires_grad_(True)
    ref = 2 * torch.randn(b, t, v, generator=gen, dtype=dtype)
    tokens = torch.randint(0, v, (b, t), generator=gen)
    upstream = [torch.randn(b, t, generator=gen, dtype=dtype) for _ in range(2)]

    fused = token_stats(policy, ref, tokens, chunk_rows=chunk_rows)
    expected = naive(policy, ref, tokens)
    tol = TOLERANCE[dtype]
    for got, want in zip((fused.logp, fused.logq, fused.kl, fused.entropy), expected, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=tol, atol=tol)

    (g_fused,) = torch.autograd.grad((fused.logp * upstream[0] + fused.kl * upstream[1]).sum(), policy)
    (g_naive,) = torch.autograd.grad((expected[0] * upstream[0] + expected[2] * upstream[1]).sum(), policy)
    torch.testing.assert_close(g_fused, g_naive, rtol=tol, atol=tol)


def test_bf16_logits_are_upcast_and_the_gradient_keeps_their_dtype():
    gen = torch.Generator().manual_seed(1)
    policy = torch.randn(2, 4, 7, generator=gen).bfloat16().requires_grad_(True)
    ref = torch.randn(2, 4, 7, generator=gen).bfloat16()
    tokens = torch.randint(0, 7, (2, 4), generator=gen)
    fused = token_stats(policy, ref, tokens, chunk_rows=3)
    expected = naive(policy.float(), ref.float(), tokens)
    assert fused.kl.dtype == torch.float32
    torch.testing.assert_close(fused.kl, expected[2].detach(), rtol=1e-5, atol=1e-5)
    fused.kl.sum().backward()
    assert policy.grad.dtype == torch.bfloat16


def test_without_kl_grad_the_kl_is_a_constant():
    policy = torch.randn(2, 3, 5, requires_grad=True)
    stats = token_stats(policy, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), kl_grad=False)
    assert not stats.kl.requires_grad
    assert stats.logp.requires_grad


def test_zero_probability_tokens_contribute_nothing():
    # -inf logits (a masked vocabulary) must give 0 * log 0 = 0, not NaN.
    policy = torch.tensor([[[0.0, float("-inf"), 0.0]]], requires_grad=True)
    ref = torch.tensor([[[0.0, float("-inf"), 1.0]]])
    stats = token_stats(policy, ref, torch.tensor([[0]]))
    expected = naive(policy.detach()[..., [0, 2]], ref[..., [0, 2]], torch.tensor([[0]]))
    torch.testing.assert_close(stats.kl, expected[2])
    stats.kl.sum().backward()
    assert torch.isfinite(policy.grad).all() and policy.grad[0, 0, 1] == 0


@pytest.mark.parametrize("kl_grad", [True, False])
def test_inplace_gradient_equals_the_allocated_one(kl_grad):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(3, 4, 9, generator=gen, dtype=torch.float64)
    ref = torch.randn(3, 4, 9, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 9, (3, 4), generator=gen)
    grads = []
    for inplace in (False, True):
        leaf = base.clone().requires_grad_(True)
        logits = leaf * 1.0  # a fresh non-leaf, like the LM head's output
        stats = token_stats(logits, ref, tokens, kl_grad=kl_grad, chunk_rows=5, inplace=inplace)
        (stats.logp.sum() + stats.kl.sum()).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


def test_inplace_gradient_refuses_logits_that_another_op_saved():
    leaf = torch.randn(2, 3, 5, requires_grad=True)
    logits = torch.tanh(leaf)  # tanh saves its output for backward
    stats = token_stats(logits, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stats.kl.sum().backward()


def shifted_pair(gen: torch.Generator, rows: int = 48, vocab: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    # A reference equal to the policy shifted by a constant, plus a little noise: the softmax barely
    # changes, so the true KL is small while the terms of <p, x - y> - lse_p + lse_q are large.
    policy = 4 * torch.randn(1, rows, vocab, generator=gen)
    ref = policy + 30.0 + 0.3 * torch.randn(1, rows, vocab, generator=gen)
    return policy, ref


@pytest.mark.parametrize("kl_grad", [True, False])
def test_bf16_autocast_changes_neither_values_nor_gradients(kl_grad):
    gen = torch.Generator().manual_seed(3)
    policy, ref = shifted_pair(gen)
    tokens = torch.randint(0, policy.shape[-1], policy.shape[:2], generator=gen)
    upstream = torch.randn(2, *tokens.shape, generator=gen)
    results = []
    for autocast in (False, True):
        leaf = policy.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            stats = token_stats(leaf, ref, tokens, kl_grad=kl_grad)
            loss = (stats.logp * upstream[0] + stats.kl * upstream[1]).sum()
        loss.backward()
        results.append((stats.logp, stats.kl, stats.entropy, leaf.grad))
    for plain, autocast in zip(*results, strict=True):
        assert autocast.dtype == torch.float32
        torch.testing.assert_close(autocast, plain, rtol=1e-5, atol=1e-5)
    exact = naive(policy.double(), ref.double(), tokens)[2]
    torch.testing.assert_close(results[1][1].double(), exact, rtol=0, atol=1e-3)


def test_a_strided_view_gives_what_its_contiguous_copy_gives():
    # What users pass: model(ids).logits[:, P - 1 : -1], a view that a flattening reshape would copy.
    gen = torch.Generator().manual_seed(4)
    full = torch.randn(3, 9, 13, generator=gen, dtype=torch.float64)
    ref_full = torch.randn(3, 9, 13, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 13, (3, 6), generator=gen)
    grads, values = [], []
    for make in (lambda t: t[:, 2:-1], lambda t: t[:, 2:-1].contiguous()):
        leaf = full.clone().requires_grad_(True)
        stats = token_stats(make(leaf), make(ref_full), tokens, chunk_rows=4)
        (stats.logp.sum() + (stats.kl * torch.arange(6.0, dtype=torch.float64)).sum()).backward()
        values.append(torch.stack([stats.logp, stats.kl, stats.entropy]))
        grads.append(leaf.grad)
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)
