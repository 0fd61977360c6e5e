"""The fused LM-head op equals token_stats on materialised logits: values and gradients w.r.t. the
policy's hidden states, head weight and bias, for every chunking, soft-cap, tied heads, a
reference of another width, and under bf16 autocast."""

import pytest
import torch

from {{ cookiecutter.package_name }}.kl.fused_head import fused_token_stats
from {{ cookiecutter.package_name }}.kl.tensor_memory import peak_tensor_bytes
from {{ cookiecutter.package_name }}.kl.token_stats import token_stats

FIELDS = ("logp", "logq", "kl", "entropy")


def case(gen, b=3, t=5, h=6, hq=6, v=13, bias=True, dtype=torch.float32):
    hp = torch.randn(b, t, h, generator=gen, dtype=dtype).requires_grad_(True)
    wp = (0.8 * torch.randn(v, h, generator=gen, dtype=dtype)).requires_grad_(True)
    bp = (0.5 * torch.randn(v, generator=gen, dtype=dtype)).requires_grad_(True) if bias else None
    hr = torch.randn(b, t, hq, generator=gen, dtype=dtype)
    wr = 0.8 * torch.randn(v, hq, generator=gen, dtype=dtype)
    br = 0.5 * torch.randn(v, generator=gen, dtype=dtype) if bias else None
    tokens = torch.randint(0, v, (b, t), generator=gen)
    return hp, wp, bp, hr, wr, br, tokens


def materialised(hp, wp, bp, hr, wr, br, tokens, softcap=None, kl_grad=True, ref_softcap="same"):
    ref_softcap = softcap if ref_softcap == "same" else ref_softcap
    x = torch.nn.functional.linear(hp, wp, bp)
    y = torch.nn.functional.linear(hr, wr, br)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    if ref_softcap is not None:
        y = ref_softcap * torch.tanh(y / ref_softcap)
    return token_stats(x, y, tokens, kl_grad=kl_grad)


def values_and_grads(stats, upstream, leaves):
    loss = (stats.logp * upstream[0] + stats.kl * upstream[1]).sum()
    grads = torch.autograd.grad(loss, [leaf for leaf in leaves if leaf is not None], allow_unused=True)
    return [getattr(stats, f).detach() for f in FIELDS], grads


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 15, None])  # 15 rows: 4 and 7 cut inside a sequence
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("kl_grad", [True, False])
def test_values_and_gradients_equal_the_materialised_logits(chunk_rows, softcap, kl_grad):
    gen = torch.Generator().manual_seed(0)
    hp, wp, bp, hr, wr, br, tokens = case(gen)
    upstream = torch.randn(2, *tokens.shape, generator=gen)
    fused = fused_token_stats(
        hp,
        wp,
        hr,
        wr,
        tokens,
        policy_bias=bp,
        ref_bias=br,
        kl_grad=kl_grad,
        chunk_rows=chunk_rows,
        softcap=softcap,
        ref_softcap=softcap,
    )
    expected = materialised(hp, wp, bp, hr, wr, br, tokens, softcap, kl_grad)
    got_values, got_grads = values_and_grads(fused, upstream, (hp, wp, bp))
    want_values, want_grads = values_and_grads(expected, upstream, (hp, wp, bp))
    for got, want in zip(got_values + list(got_grads), want_values + list(want_grads), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fused.kl.requires_grad == kl_grad and not fused.logq.requires_grad and not fused.entropy.requires_grad


@pytest.mark.parametrize("softcap, ref_softcap", [(2.0, None), (None, 1.5), (2.0, 3.0)])
def test_each_model_gets_its_own_softcap(softcap, ref_softcap):
    # A Gemma-2 policy against a reference without a soft-cap (or another one): each its own.
    gen = torch.Generator().manual_seed(6)
    hp, wp, bp, hr, wr, br, tokens = case(gen)
    upstream = torch.randn(2, *tokens.shape, generator=gen)
    fused = fused_token_stats(
        hp, wp, hr, wr, tokens, policy_bias=bp, ref_bias=br, chunk_rows=4, softcap=softcap, ref_softcap=ref_softcap
    )
    expected = materialised(hp, wp, bp, hr, wr, br, tokens, softcap, ref_softcap=ref_softcap)
    got, want = values_and_grads(fused, upstream, (hp, wp, bp)), values_and_grads(expected, upstream, (hp, wp, bp))
    for a, b in zip(got[0] + list(got[1]), want[0] + list(want[1]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunk_rows_zero_is_refused():
    hp, wp, _, hr, wr, _, tokens = case(torch.Generator().manual_seed(7), bias=False)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        fused_token_stats(hp, wp, hr, wr, tokens, chunk_rows=0)


def test_one_row_no_bias_and_a_reference_of_another_width():
    gen = torch.Generator().manual_seed(1)
    hp, wp, _, hr, wr, _, tokens = case(gen, b=1, t=1, h=4, hq=9, v=17, bias=False)
    upstream = torch.randn(2, 1, 1, generator=gen)
    got = values_and_grads(fused_token_stats(hp, wp, hr, wr, tokens), upstream, (hp, wp))
    want = values_and_grads(materialised(hp, wp, None, hr, wr, None, tokens), upstream, (hp, wp))
    for a, b in zip(got[0] + list(got[1]), want[0] + list(want[1]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_tied_head_gets_the_gradient_of_both_of_its_uses():
    # The embedding and the LM head are one parameter (GPT-2, Qwen2 small): the hidden states are
    # made from it too, so its gradient is the sum of both paths.
    gen = torch.Generator().manual_seed(2)
    v, h = 11, 5
    shared = torch.randn(v, h, generator=gen).requires_grad_(True)
    ids = torch.randint(0, v, (2, 4), generator=gen)
    mix = torch.randn(h, h, generator=gen)
    ref_w, tokens = torch.randn(v, h, generator=gen), torch.randint(0, v, (2, 4), generator=gen)
    grads = []
    for fused in (True, False):
        hidden = torch.tanh(shared[ids] @ mix)  # [2, 4, h], from the same weight
        ref_hidden = hidden.detach() + 0.1
        if fused:
            stats = fused_token_stats(hidden, shared, ref_hidden, ref_w, tokens)
        else:
            stats = token_stats(hidden @ shared.T, ref_hidden @ ref_w.T, tokens)
        (stats.logp.sum() + stats.kl.sum()).backward()
        grads.append(shared.grad.clone())
        shared.grad = None
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kl_grad", [True, False])
def test_under_bf16_autocast_the_head_multiplies_as_the_models_own_head_would(kl_grad):
    # bf16-mixed: the model's head multiplies in bf16 (its logits bf16, upcast for the statistics),
    # and so must the fused op, or on a GPU it would run six float32 matmuls against four in bf16.
    gen = torch.Generator().manual_seed(3)
    hp, wp, bp, hr, wr, br, tokens = case(gen, t=24, h=32, hq=32, v=40)
    upstream = torch.randn(2, *tokens.shape, generator=gen)
    results = {}
    for name, autocast in (("float32", False), ("fused bf16", True), ("logits bf16", True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if name.startswith("fused") or not autocast:
                stats = fused_token_stats(
                    hp, wp, hr, wr, tokens, policy_bias=bp, ref_bias=br, kl_grad=kl_grad, chunk_rows=16
                )
            else:
                stats = materialised(hp, wp, bp, hr, wr, br, tokens, kl_grad=kl_grad)
        values, grads = values_and_grads(stats, upstream, (hp, wp, bp))
        results[name] = values + list(grads)
    fused, logits = results["fused bf16"], results["logits bf16"]
    # The same bf16 logits: the statistics and the hidden states' gradient agree to float32 rounding.
    for a, b in zip(fused[:5], logits[:5], strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # The weight's and bias's gradients: bf16 products per chunk summed in float32 (fused), one bf16
    # product of all rows (autograd through the bf16 logits): within bf16 resolution of their scale.
    for a, b in zip(fused[5:], logits[5:], strict=True):
        assert (a - b).abs().max() <= 2**-7 * b.abs().max()
    # ... and not the float32 op, which a fused op that ignored autocast would equal.
    assert (results["float32"][0] - fused[0]).abs().max() > 1e-2


def test_bf16_weights_give_what_their_bf16_logits_give():
    gen = torch.Generator().manual_seed(4)
    hp, wp, bp, hr, wr, br, tokens = (t if t is None or t.dtype == torch.long else t.detach() for t in case(gen))
    hp, wp, hr, wr = (t.bfloat16() for t in (hp, wp, hr, wr))
    hp.requires_grad_(True), wp.requires_grad_(True)
    upstream = torch.randn(2, *tokens.shape, generator=gen)
    got = values_and_grads(fused_token_stats(hp, wp, hr, wr, tokens), upstream, (hp, wp))
    want = values_and_grads(token_stats(hp @ wp.T, hr @ wr.T, tokens), upstream, (hp, wp))
    for a, b in zip(got[0], want[0], strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], want[1], strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "policy_weight": a["policy_weight"][:, :3]}, "policy weight must be"),
        (lambda a: {**a, "ref_weight": a["ref_weight"][:5]}, "different vocabularies"),
        (lambda a: {**a, "tokens": a["tokens"][:, :2]}, "must be .B, T. of both hidden states"),
        (lambda a: {**a, "tokens": a["tokens"] + 100}, "must lie in"),
    ],
)
def test_mismatched_shapes_are_clear_errors(change, match):
    hp, wp, _, hr, wr, _, tokens = case(torch.Generator().manual_seed(5), bias=False)
    args = {"policy_hidden": hp, "policy_weight": wp, "ref_hidden": hr, "ref_weight": wr, "tokens": tokens}
    with pytest.raises(ValueError, match=match):
        fused_token_stats(**change(args))


@pytest.mark.parametrize(("softcap", "kl_grad", "buffers"), [(None, True, 2), (None, False, 2), (2.5, True, 3)])
def test_at_most_two_or_three_chunks_of_logits_are_ever_held(softcap, kl_grad, buffers):
    # What the op is for: besides the head's [V, H] weight gradient, its peak is a few [rows, V]
    # chunks (docs/estimators.md §9), not the [B, T, V] logits, and no chunk-sized temporaries.
    gen = torch.Generator().manual_seed(8)
    b, t, h, v, rows = 4, 16, 8, 4096, 8
    hp, wp, bp, hr, wr, br, tokens = case(gen, b=b, t=t, h=h, hq=h, v=v)
    chunk, weight_grad = rows * v * 4, v * h * 4

    def step(fused: bool):
        def run():
            if fused:
                stats = fused_token_stats(hp, wp, hr, wr, tokens, kl_grad=kl_grad, chunk_rows=rows, softcap=softcap)
            else:
                stats = materialised(hp, wp, None, hr, wr, None, tokens, softcap=softcap, kl_grad=kl_grad)
            torch.autograd.grad((stats.logp + stats.kl).sum(), [hp, wp])

        return run

    # Rows x H tensors (hidden states, their gradient) and per-row numbers come on top: 32 KiB here.
    assert peak_tensor_bytes(step(fused=True)) <= buffers * chunk + weight_grad + 32 * 1024
    assert peak_tensor_bytes(step(fused=False)) >= 2 * b * t * v * 4  # the profile sees the logits
