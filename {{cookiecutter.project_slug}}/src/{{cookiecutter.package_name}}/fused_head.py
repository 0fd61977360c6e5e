"""The per-token statistics straight from the final hidden states and the LM heads: no [B, T, V] logits.

    fused_token_stats(policy_hidden, policy_weight, ref_hidden, ref_weight, tokens, *,
                      policy_bias=None, ref_bias=None, kl_grad=True, chunk_rows=None, softcap=None)

returns what `token_stats` returns on the logits x = h_p W_p^T + b_p and y = h_q W_q^T + b_q
(with `softcap` c: c tanh(. / c) applied to both, as Gemma-2 does), but holds one chunk of
[rows, V] logits at a time: forward keeps only the hidden states and per-row log-normalisers,
and backward recomputes each chunk's logits from them (docs/estimators.md §9). The
reference's hidden width may differ from the policy's (a distillation teacher of another size
that shares the vocabulary); the reference is never differentiated.

Statistics are float32 (float64 for float64 inputs) with autocast off, as in `token_stats`; the
matmuls run in the weights' dtype (bf16 weights: bf16 logits, as the model's own head makes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .token_stats import TokenStats, compute_dtype

# Rows per chunk by default: [rows, V] float32 buffers of 32 MiB. Each chunk reads the whole [V, H]
# weight (three to six matmuls), so smaller chunks cost time; three such buffers are live at once.
FUSED_CHUNK_ELEMENTS = 1 << 23


def fused_token_stats(
    policy_hidden: Tensor,
    policy_weight: Tensor,
    ref_hidden: Tensor,
    ref_weight: Tensor,
    tokens: Tensor,
    *,
    policy_bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
    kl_grad: bool = True,
    chunk_rows: int | None = None,
    softcap: float | None = None,
    ref_softcap: float | None = None,
) -> TokenStats:
    """Per-token statistics [B, T] of the LM heads' distributions, differentiable w.r.t. the policy's
    hidden states, weight and bias (kl only when `kl_grad`); hidden [B, T, H], weights [V, H].
    `softcap` caps the policy's logits, `ref_softcap` the reference's (each model's own)."""
    _check(policy_hidden, policy_weight, ref_hidden, ref_weight, tokens, policy_bias, ref_bias)
    batch, length = tokens.shape
    rows = max(1, FUSED_CHUNK_ELEMENTS // policy_weight.shape[0]) if chunk_rows is None else chunk_rows
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {rows}")
    out = _FusedHead.apply(
        policy_hidden.reshape(batch * length, -1),
        policy_weight,
        policy_bias,
        ref_hidden.detach().reshape(batch * length, -1),
        ref_weight.detach(),
        None if ref_bias is None else ref_bias.detach(),
        tokens.reshape(-1),
        kl_grad,
        rows,
        (softcap, ref_softcap),
    )
    logp, logq, kl, entropy = (t.reshape(batch, length) for t in out)
    return TokenStats(logp=logp, logq=logq.detach(), kl=kl if kl_grad else kl.detach(), entropy=entropy.detach())


def _check(policy_hidden, policy_weight, ref_hidden, ref_weight, tokens, policy_bias, ref_bias) -> None:
    if policy_hidden.dim() != 3 or ref_hidden.dim() != 3:
        raise ValueError(
            f"hidden states must be [B, T, H], got {tuple(policy_hidden.shape)} and {tuple(ref_hidden.shape)}"
        )
    if tokens.shape != policy_hidden.shape[:2] or tokens.shape != ref_hidden.shape[:2]:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} must be [B, T] of both hidden states "
            f"{tuple(policy_hidden.shape)} and {tuple(ref_hidden.shape)}"
        )
    if tokens.dtype != torch.long:
        raise TypeError(f"tokens must be torch.long, got {tokens.dtype}")
    for name, hidden, weight, bias in (
        ("policy", policy_hidden, policy_weight, policy_bias),
        ("reference", ref_hidden, ref_weight, ref_bias),
    ):
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"the {name} weight must be [V, H] with H = {hidden.shape[-1]}, got {tuple(weight.shape)}")
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"the {name} bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if policy_weight.shape[0] != ref_weight.shape[0]:
        raise ValueError(
            f"policy and reference heads have different vocabularies ({policy_weight.shape[0]} vs "
            f"{ref_weight.shape[0]}); they must share one"
        )
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= policy_weight.shape[0]):
        raise ValueError(f"tokens must lie in [0, {policy_weight.shape[0]}), the vocabulary")


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, dtype: torch.dtype) -> Tensor:
    """[rows, V] logits of one chunk in `dtype`; the matmul in the weights' dtype."""
    x = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).to(dtype)
    return x if softcap is None else softcap * torch.tanh(x / softcap)


class _FusedHead(torch.autograd.Function):
    # Three [rows, V] buffers at a time, forward and backward: x, y and p, the rest in place.
    @staticmethod
    def forward(ctx, hp, wp, bp, hq, wq, bq, tokens, kl_grad, rows, softcaps):
        softcap, ref_softcap = softcaps
        dtype = compute_dtype(torch.promote_types(hp.dtype, wp.dtype))
        n = tokens.shape[0]
        logp, logq, kl, entropy, lse_x, lse_y = (torch.empty(n, dtype=dtype, device=hp.device) for _ in range(6))
        with torch.autocast(hp.device.type, enabled=False):
            for start in range(0, n, rows):
                part, token = slice(start, start + rows), tokens[start : start + rows, None]
                x = _logits(hp[part], wp, bp, softcap, dtype)  # [rows, V]
                y = _logits(hq[part], wq, bq, ref_softcap, dtype)  # [rows, V]
                lse_x[part], lse_y[part] = torch.logsumexp(x, -1), torch.logsumexp(y, -1)
                logp[part] = x.gather(-1, token).squeeze(-1) - lse_x[part]
                logq[part] = y.gather(-1, token).squeeze(-1) - lse_y[part]
                p = (x - lse_x[part, None]).exp_()
                px, py = torch.linalg.vecdot(p, x), torch.linalg.vecdot(p, y)
                kl[part] = px - py - lse_x[part] + lse_y[part]
                entropy[part] = lse_x[part] - px
        kl.clamp_(min=0)  # >= 0 exactly; rounding can leave -1e-7, as in token_stats
        ctx.save_for_backward(hp, wp, bp, hq, wq, bq, tokens, lse_x, lse_y, kl)
        ctx.kl_grad, ctx.rows, ctx.softcaps, ctx.dtype = kl_grad, rows, softcaps, dtype
        ctx.mark_non_differentiable(logq, entropy)
        return logp, logq, kl, entropy

    @staticmethod
    def backward(ctx, g_logp, g_logq, g_kl, g_entropy):
        hp, wp, bp, hq, wq, bq, tokens, lse_x, lse_y, kl = ctx.saved_tensors
        dtype, (softcap, ref_softcap) = ctx.dtype, ctx.softcaps
        use_kl = ctx.kl_grad and g_kl is not None
        a = torch.zeros_like(lse_x) if g_logp is None else g_logp.to(dtype)
        k = g_kl.to(dtype) if use_kl else None
        grad_h = torch.empty_like(hp) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(wp.shape, dtype=dtype, device=wp.device) if ctx.needs_input_grad[1] else None
        needs_b = bp is not None and ctx.needs_input_grad[2]
        grad_b = torch.zeros(wp.shape[0], dtype=dtype, device=wp.device) if needs_b else None
        with torch.autocast(hp.device.type, enabled=False):
            for start in range(0, tokens.shape[0], ctx.rows):
                part = slice(start, start + ctx.rows)
                # Recomputed from the saved hidden states and log-normalisers: log p, then p.
                logp = _logits(hp[part], wp, bp, softcap, dtype).sub_(lse_x[part, None])  # [rows, V]
                p = logp.exp()
                # g = a (onehot - p) + k p (log p - log q - kl) = p ((log p - log q - kl) k - a) + a onehot
                if use_kl:
                    g = _logits(hq[part], wq, bq, ref_softcap, dtype).sub_(lse_y[part, None])  # log q
                    g.neg_().add_(logp).sub_(kl[part, None]).mul_(k[part, None]).sub_(a[part, None]).mul_(p)
                else:
                    g = p.mul_(-a[part, None])
                g.scatter_add_(-1, tokens[part, None], a[part, None])
                if softcap is not None:  # d (c tanh(z / c)) / dz = 1 - (x / c)^2, x = log p + lse
                    g.mul_(logp.add_(lse_x[part, None]).div_(softcap).square_().neg_().add_(1))
                if grad_h is not None:
                    grad_h[part] = (g.to(wp.dtype) @ wp).to(hp.dtype)
                if grad_w is not None:
                    grad_w.addmm_(g.T, hp[part].to(dtype))
                if grad_b is not None:
                    grad_b += g.sum(0)
        grad_w = None if grad_w is None else grad_w.to(wp.dtype)
        grad_b = None if grad_b is None else grad_b.to(bp.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None
