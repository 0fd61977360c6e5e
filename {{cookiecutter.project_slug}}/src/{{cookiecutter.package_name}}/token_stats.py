"""Per-token statistics of a policy p against a reference q, fused and chunked over positions.

Every KL estimator in `estimators.py` is a function of four per-token quantities
(docs/estimators.md §2):

    logp_t = log p(y_t | y_<t)        logq_t = log q(y_t | y_<t)
    kl_t   = sum_v p(v | y_<t) (log p(v | y_<t) - log q(v | y_<t))     (exact, full vocabulary)
    ent_t  = - sum_v p(v | y_<t) log p(v | y_<t)

A naive implementation materialises log_softmax of both models, p, and their products: several
[B, T, V] tensors, which dominate memory for 50k-150k vocabularies (docs/estimators.md §6.8).
Here one pass over row chunks of the logits (x: policy, y: reference) computes all four, using
sum_v p_v = 1 to avoid a log-softmax per element:

    kl_t = <p_t, x_t - y_t> - lse(x_t) + lse(y_t)        ent_t = lse(x_t) - <p_t, x_t>

Backward recomputes each chunk's softmax from the saved logits and log-normalisers, using

    d logp_t / d x_t = onehot(token_t) - p_t
    d kl_t   / d x_t = p_t * (log p_t - log q_t - kl_t)

so the only full-vocabulary tensors alive are the logits themselves and the gradient, which
with `inplace_grad` overwrites the policy logits it was computed from.
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


def _safe_rows(x: Tensor, y: Tensor, lse_p: Tensor, lse_q: Tensor) -> tuple[Tensor, Tensor]:
    """KL and entropy of rows with -inf logits (a masked vocabulary), where 0 * log 0 must be 0."""
    logp, logq = x - lse_p[:, None], y - lse_q[:, None]
    p = logp.exp()
    kl = (p * (logp - logq)).nan_to_num_(nan=0.0, posinf=float("inf")).sum(-1)
    ent = -(p * logp).nan_to_num_(nan=0.0).sum(-1)
    return kl, ent


class _TokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy_logits, ref_logits, tokens, kl_grad, chunk_rows, inplace_grad):
        vocab = policy_logits.shape[-1]
        x = policy_logits.reshape(-1, vocab)  # [N, V]
        y = ref_logits.reshape(-1, vocab)  # [N, V]
        tok = tokens.reshape(-1, 1)  # [N, 1]
        dtype = _compute_dtype(policy_logits.dtype)
        out = torch.empty(6, x.shape[0], dtype=dtype, device=x.device)
        logp_tok, logq_tok, kl, ent, lse_p, lse_q = out
        for start in range(0, x.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            xc, yc = x[rows].to(dtype), y[rows].to(dtype)  # [c, V]
            torch.logsumexp(xc, dim=-1, out=lse_p[rows])
            torch.logsumexp(yc, dim=-1, out=lse_q[rows])
            logp_tok[rows] = xc.gather(1, tok[rows]).squeeze(1) - lse_p[rows]
            logq_tok[rows] = yc.gather(1, tok[rows]).squeeze(1) - lse_q[rows]
            p = torch.sub(xc, lse_p[rows, None]).exp_()  # [c, V]
            # Because sum_v p_v = 1:  KL_t = <p, x - y> - lse_p + lse_q  and  H_t = lse_p - <p, x>.
            kl[rows] = torch.linalg.vecdot(p, torch.sub(xc, yc)) - (lse_p[rows] - lse_q[rows])
            ent[rows] = lse_p[rows] - torch.linalg.vecdot(p, xc)
        # -inf logits give 0 * inf = nan above; such rows are rare and recomputed the safe way.
        # (NaN logits also land here, but they poison logp/logq, which callers check.)
        bad = torch.isnan(kl) | torch.isnan(ent)
        ctx.has_bad_rows = bool(bad.any())
        if ctx.has_bad_rows:
            kl[bad], ent[bad] = _safe_rows(x[bad].to(dtype), y[bad].to(dtype), lse_p[bad], lse_q[bad])
        kl.clamp_(min=0.0)  # KL_t >= 0; rounding can leave -1e-7 when p is close to q
        ctx.kl_grad = kl_grad
        ctx.chunk_rows = chunk_rows
        ctx.inplace_grad = inplace_grad
        ctx.set_materialize_grads(False)
        # The reference logits are kept for backward only when the KL itself is differentiated.
        ctx.save_for_backward(policy_logits, ref_logits if kl_grad else None, tokens, kl, lse_p, lse_q)
        shape = tokens.shape
        return logp_tok.view(shape), logq_tok.view(shape), kl.view(shape), ent.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_logq, g_kl, g_ent):
        policy_logits, ref_logits, tokens, kl, lse_p, lse_q = ctx.saved_tensors
        if not ctx.kl_grad:
            g_kl = None
        if g_logp is None and g_kl is None:
            return None, None, None, None, None, None
        vocab = policy_logits.shape[-1]
        x = policy_logits.reshape(-1, vocab)
        y = None if g_kl is None else ref_logits.reshape(-1, vocab)
        tok = tokens.reshape(-1, 1)
        dtype = kl.dtype
        g_logp = torch.zeros_like(kl) if g_logp is None else g_logp.reshape(-1).to(dtype)
        # Writing the gradient over the logits saves a [B, T, V] buffer; autograd's version
        # check still raises if anything else saved these logits for its own backward.
        grad = x if ctx.inplace_grad else torch.empty_like(x)
        if g_kl is not None:
            g_kl = g_kl.reshape(-1).to(dtype)
            # d/dz [g_kl KL_t + g_logp logp_t] = p * (g_kl (x - y - shift) - g_logp) + g_logp onehot
            offset = (g_kl * (lse_p - lse_q + kl) + g_logp)[:, None]
        for start in range(0, x.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            xc = x[rows].to(dtype)
            p = torch.sub(xc, lse_p[rows, None]).exp_()  # [c, V]
            # Write straight into the gradient buffer when it has the compute dtype (it may be
            # xc's own storage: each element is read before it is overwritten).
            target = grad[rows] if grad.dtype == dtype else None
            if g_kl is None:
                gc = torch.mul(p, -g_logp[rows, None], out=target)
            else:
                gc = torch.sub(xc, y[rows].to(dtype), out=target)
                gc.mul_(g_kl[rows, None]).sub_(offset[rows]).mul_(p)
                if ctx.has_bad_rows:
                    gc.nan_to_num_(nan=0.0)  # p = 0 where x = -inf: no gradient there
            gc.scatter_add_(1, tok[rows], g_logp[rows, None])
            if target is None:
                grad[rows] = gc
        return grad.view_as(policy_logits), None, None, None, None, None


def token_stats(
    policy_logits: Tensor,
    ref_logits: Tensor,
    tokens: Tensor,
    *,
    kl_grad: bool = True,
    chunk_rows: int | None = None,
    inplace_grad: bool = False,
) -> TokenStats:
    """Compute logp, logq, exact per-token KL and entropy in one chunked pass.

    Args:
        policy_logits: [B, T, V] logits of p; position t produced tokens[:, t].
        ref_logits: [B, T, V] logits of q at the same positions (never differentiated).
        tokens: [B, T] long, every id in [0, V) (callers replace padding by a valid id).
        kl_grad: keep what backward needs to differentiate `kl` (the RB pathwise term). Off,
            the reference logits are released after forward and `kl` carries no gradient.
        chunk_rows: rows of the flattened [B*T, V] logits processed at once.
        inplace_grad: backward overwrites `policy_logits` with their gradient instead of
            allocating another [B, T, V] buffer. Only for logits nothing else will read, such as
            the fresh output of the LM head.
    """
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(policy_logits.shape[-1])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    logp, logq, kl, ent = _TokenStatsFunction.apply(
        policy_logits, ref_logits.detach(), tokens, kl_grad, chunk_rows, inplace_grad
    )
    # The outputs are views of one buffer, which mark_non_differentiable does not cover.
    return TokenStats(logp=logp, logq=logq.detach(), kl=kl if kl_grad else kl.detach(), entropy=ent.detach())
