"""Per-token statistics of a policy p against a reference q, fused and chunked over positions.

Every KL estimator in `estimators.py` is a function of four per-token quantities (DESIGN.md
section 3):

    logp_t = log p(y_t | y_<t)        logq_t = log q(y_t | y_<t)
    kl_t   = sum_v p(v | y_<t) (log p(v | y_<t) - log q(v | y_<t))     (exact, full vocabulary)
    ent_t  = - sum_v p(v | y_<t) log p(v | y_<t)

A naive implementation materialises log_softmax of both models, p, and their products: several
[B, T, V] tensors, which dominate memory for 50k-150k vocabularies (DESIGN.md trap 8). Here one
pass over row chunks of the logits computes all four at once, and backward recomputes the
chunk's softmax from the saved logits and two log-normalisers, using

    d logp_t / d z_t = onehot(y_t) - p_t
    d kl_t   / d z_t = p_t * (log p_t - log q_t - kl_t)         (z_t: policy logits at t)

so the only full-vocabulary tensors alive are the logits themselves and the gradient buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Rows per chunk are chosen so that one chunk of float32 logits is about this many elements:
# small enough to stay in cache for the chain of elementwise ops, large enough to amortise the
# per-op overhead.
_CHUNK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics, each [B, T] in float32 (float64 for float64 logits)."""

    logp: Tensor  # differentiable w.r.t. the policy logits
    logq: Tensor  # no gradient: the reference is frozen
    kl: Tensor  # differentiable w.r.t. the policy logits when computed with kl_grad=True
    entropy: Tensor  # no gradient


def default_chunk_rows(vocab_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab_size)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits are upcast chunk by chunk: log-ratios of nearby probabilities cancel
    # catastrophically in half precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _plogratio(p: Tensor, logp: Tensor, logq: Tensor) -> Tensor:
    # Tokens with p = 0 (e.g. masked with -inf logits) contribute 0, not 0 * inf = nan. NaN
    # inputs are caught by the caller's finiteness check on logp/logq, which they poison.
    return (p * (logp - logq)).nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))


def _log_softmax_rows(z: Tensor, dtype: torch.dtype, lse_out: Tensor) -> Tensor:
    """log_softmax of a [n, V] chunk in `dtype`; writes the log-normalisers into `lse_out`."""
    zc = z.to(dtype)
    torch.logsumexp(zc, dim=-1, out=lse_out)
    # An upcast chunk is our own copy and may be overwritten; the caller's logits may not.
    return zc.sub_(lse_out[:, None]) if z.dtype != dtype else zc - lse_out[:, None]


class _TokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy_logits, ref_logits, tokens, kl_grad, chunk_rows):
        vocab = policy_logits.shape[-1]
        x = policy_logits.reshape(-1, vocab)  # [N, V]
        y = ref_logits.reshape(-1, vocab)  # [N, V]
        tok = tokens.reshape(-1, 1)  # [N, 1]
        dtype = _compute_dtype(policy_logits.dtype)
        out = torch.empty(6, x.shape[0], dtype=dtype, device=x.device)
        logp_tok, logq_tok, kl, ent, lse_p, lse_q = out
        for start in range(0, x.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logp = _log_softmax_rows(x[rows], dtype, lse_p[rows])
            logq = _log_softmax_rows(y[rows], dtype, lse_q[rows])
            logp_tok[rows] = logp.gather(1, tok[rows]).squeeze(1)
            logq_tok[rows] = logq.gather(1, tok[rows]).squeeze(1)
            p = logp.exp()
            kl[rows] = _plogratio(p, logp, logq).sum(-1)
            ent[rows] = -_plogratio(p, logp, torch.zeros((), dtype=dtype, device=x.device)).sum(-1)
        ctx.kl_grad = kl_grad
        ctx.chunk_rows = chunk_rows
        ctx.set_materialize_grads(False)
        # The reference logits are kept for backward only when the KL itself is differentiated.
        saved_ref = ref_logits if kl_grad else None
        ctx.save_for_backward(policy_logits, saved_ref, tokens, kl, lse_p, lse_q)
        shape = tokens.shape
        return (
            logp_tok.view(shape),
            logq_tok.view(shape),
            kl.view(shape),
            ent.view(shape),
        )

    @staticmethod
    def backward(ctx, g_logp, g_logq, g_kl, g_ent):
        policy_logits, ref_logits, tokens, kl, lse_p, lse_q = ctx.saved_tensors
        if not ctx.kl_grad:
            g_kl = None
        if g_logp is None and g_kl is None:
            return None, None, None, None, None
        vocab = policy_logits.shape[-1]
        x = policy_logits.reshape(-1, vocab)
        tok = tokens.reshape(-1, 1)
        dtype = kl.dtype
        g_logp = None if g_logp is None else g_logp.reshape(-1, 1).to(dtype)
        g_kl = None if g_kl is None else g_kl.reshape(-1, 1).to(dtype)
        y = None if g_kl is None else ref_logits.reshape(-1, vocab)
        grad = torch.empty_like(x)
        for start in range(0, x.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            logp = x[rows].to(dtype) - lse_p[rows, None]
            p = logp.exp()
            if g_kl is not None:
                logq = y[rows].to(dtype) - lse_q[rows, None]
                # d kl_t / d z = p (log p - log q - kl_t); p = 0 entries contribute nothing.
                gc = (p * (logp - logq - kl[rows, None])).nan_to_num_(nan=0.0).mul_(g_kl[rows])
                if g_logp is not None:
                    gc.addcmul_(p, g_logp[rows], value=-1.0)
            else:
                gc = p.mul_(-g_logp[rows])
            if g_logp is not None:
                gc.scatter_add_(1, tok[rows], g_logp[rows])
            grad[rows] = gc
        return grad.view_as(policy_logits), None, None, None, None


def token_stats(
    policy_logits: Tensor,
    ref_logits: Tensor,
    tokens: Tensor,
    *,
    kl_grad: bool = True,
    chunk_rows: int | None = None,
) -> TokenStats:
    """Compute logp, logq, exact per-token KL and entropy in one chunked pass.

    Args:
        policy_logits: [B, T, V] logits of p; position t produced tokens[:, t].
        ref_logits: [B, T, V] logits of q at the same positions (never differentiated).
        tokens: [B, T] long, every id in [0, V) (callers replace padding by a valid id).
        kl_grad: keep what backward needs to differentiate `kl` (the RB pathwise term). Off,
            the reference logits are released after forward and `kl` carries no gradient.
        chunk_rows: rows of the flattened [B*T, V] logits processed at once.
    """
    chunk_rows = chunk_rows or default_chunk_rows(policy_logits.shape[-1])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    logp, logq, kl, ent = _TokenStatsFunction.apply(policy_logits, ref_logits.detach(), tokens, kl_grad, chunk_rows)
    # The outputs are views of one buffer, which mark_non_differentiable does not cover.
    return TokenStats(logp=logp, logq=logq.detach(), kl=kl if kl_grad else kl.detach(), entropy=ent.detach())
