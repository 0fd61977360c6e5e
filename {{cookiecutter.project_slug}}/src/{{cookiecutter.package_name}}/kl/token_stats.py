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

Backward recomputes each block's softmax from the saved logits and log-normalisers, using

    d logp_t / d x_t = onehot(token_t) - p_t
    d kl_t   / d x_t = p_t * (log p_t - log q_t - kl_t)

so the only full-vocabulary tensors alive are the logits themselves (the reference's only while
the KL is differentiated) and the gradient, which with `inplace` overwrites the policy logits it
was computed from.

Everything is computed in float32 (float64 for float64 logits) with autocast off: under bf16
autocast, `linalg.vecdot` would run in bf16, and KL_t = <p, x - y> - lse(x) + lse(y) cancels
large terms (docs/estimators.md §6.9). Logits are read in blocks of [b, t, V] rather than
flattened, so a strided view such as `model(ids).logits[:, P - 1 : -1]` is never copied whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

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

    def detach(self) -> TokenStats:
        return TokenStats(*(t.detach() for t in astuple_shallow(self)))

    @staticmethod
    def cat(parts: list[TokenStats]) -> TokenStats:
        """Row pieces [b_i, T] of one batch -> [sum b_i, T]."""
        return TokenStats(*(torch.cat(column) for column in zip(*map(astuple_shallow, parts), strict=True)))


def astuple_shallow(stats: TokenStats) -> tuple[Tensor, ...]:
    # dataclasses.astuple deep-copies tensors; the fields themselves are what is wanted.
    return tuple(getattr(stats, f.name) for f in fields(stats))


def default_chunk_rows(vocab_size: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab_size)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits are upcast block by block: log-ratios of nearby probabilities cancel
    # catastrophically in half precision.
    return torch.float64 if dtype == torch.float64 else torch.float32


def blocks(batch: int, length: int, chunk_rows: int) -> Iterator[tuple[slice, slice]]:
    """(batch, position) slices covering [batch, length] in blocks of at most chunk_rows rows."""
    if batch == 0 or length == 0:
        return
    if length <= chunk_rows:
        step = chunk_rows // length
        for b in range(0, batch, step):
            yield slice(b, b + step), slice(None)
    else:
        for b in range(batch):
            for t in range(0, length, chunk_rows):
                yield slice(b, b + 1), slice(t, t + chunk_rows)


def _safe_rows(x: Tensor, y: Tensor, lse_p: Tensor, lse_q: Tensor) -> tuple[Tensor, Tensor]:
    """KL and entropy of rows with -inf logits (a masked vocabulary), where 0 * log 0 must be 0."""
    logp, logq = x - lse_p[:, None], y - lse_q[:, None]
    p = logp.exp()
    kl = (p * (logp - logq)).nan_to_num_(nan=0.0, posinf=float("inf")).sum(-1)
    ent = -(p * logp).nan_to_num_(nan=0.0).sum(-1)
    return kl, ent


class _TokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy_logits, ref_logits, tokens, kl_grad, chunk_rows, inplace):
        with torch.autocast(policy_logits.device.type, enabled=False):
            return _TokenStatsFunction._forward(ctx, policy_logits, ref_logits, tokens, kl_grad, chunk_rows, inplace)

    @staticmethod
    def _forward(ctx, x, y, tokens, kl_grad, chunk_rows, inplace):
        # x: policy logits [B, T, V]; y: reference logits [B, T, V]; tokens [B, T]
        batch, length, _ = x.shape
        dtype = compute_dtype(x.dtype)
        out = torch.empty(6, batch, length, dtype=dtype, device=x.device)
        logp_tok, logq_tok, kl, ent, lse_p, lse_q = out  # each [B, T]
        tok = tokens.unsqueeze(-1)  # [B, T, 1]
        for b, t in blocks(batch, length, chunk_rows):
            xc, yc = x[b, t].to(dtype), y[b, t].to(dtype)  # [b, t, V]
            lp, lq = torch.logsumexp(xc, -1), torch.logsumexp(yc, -1)  # [b, t]
            lse_p[b, t], lse_q[b, t] = lp, lq
            logp_tok[b, t] = xc.gather(-1, tok[b, t]).squeeze(-1) - lp
            logq_tok[b, t] = yc.gather(-1, tok[b, t]).squeeze(-1) - lq
            p = torch.sub(xc, lp.unsqueeze(-1)).exp_()  # [b, t, V]
            # Because sum_v p_v = 1:  KL_t = <p, x - y> - lse_p + lse_q  and  H_t = lse_p - <p, x>.
            kl[b, t] = torch.linalg.vecdot(p, torch.sub(xc, yc)) - (lp - lq)
            ent[b, t] = lp - torch.linalg.vecdot(p, xc)
        # -inf logits give 0 * inf = nan above, a reference that rules out a token the policy can
        # sample gives +inf; such rows are rare and recomputed the safe way. (NaN logits also land
        # here, but they poison logp/logq, which callers check under the mask.)
        bad = ~(torch.isfinite(kl) & torch.isfinite(ent))
        has_bad_rows = bool(bad.any())
        if has_bad_rows:
            kl[bad], ent[bad] = _safe_rows(x[bad].to(dtype), y[bad].to(dtype), lse_p[bad], lse_q[bad])
        kl.clamp_(min=0.0)  # KL_t >= 0; rounding can leave -1e-7 when p is close to q

        ctx.has_bad_rows = has_bad_rows
        ctx.chunk_rows = chunk_rows
        ctx.inplace = inplace
        ctx.set_materialize_grads(False)
        ctx.kl_grad = kl_grad
        # The reference logits are kept for backward only when the KL itself is differentiated.
        ctx.save_for_backward(x, y if kl_grad else None, tokens, kl, lse_p, lse_q)
        return logp_tok, logq_tok, kl, ent

    @staticmethod
    def backward(ctx, g_logp, g_logq, g_kl, g_ent):
        if not ctx.kl_grad:
            g_kl = None
        if g_logp is None and g_kl is None:
            return None, None, None, None, None, None
        saved = ctx.saved_tensors  # unpacked once: each access re-checks every saved tensor
        with torch.autocast(saved[0].device.type, enabled=False):
            return _TokenStatsFunction._backward(ctx, *saved, g_logp, g_kl), *(None,) * 5

    @staticmethod
    def _backward(ctx, x, y, tokens, kl, lse_p, lse_q, g_logp, g_kl):
        dtype = kl.dtype
        g_logp = torch.zeros_like(kl) if g_logp is None else g_logp.to(dtype)
        if g_kl is not None:
            g_kl = g_kl.to(dtype)
            # d/dx [g_kl KL_t + g_logp logp_t] = p * (g_kl (x - y - shift) - g_logp) + g_logp onehot
            offset = g_kl * (lse_p - lse_q + kl) + g_logp  # [B, T]
        # Writing the gradient over the logits saves a [B, T, V] buffer; autograd's version
        # check still raises if anything else saved these logits for its own backward.
        grad = x if ctx.inplace else torch.empty_like(x)
        tok = tokens.unsqueeze(-1)
        for b, t in blocks(*x.shape[:2], ctx.chunk_rows):
            xc = x[b, t].to(dtype)  # [b, t, V]
            p = torch.sub(xc, lse_p[b, t].unsqueeze(-1)).exp_()
            if g_kl is None:
                gc = p.mul_(-g_logp[b, t].unsqueeze(-1))
            else:
                gc = torch.sub(xc, y[b, t].to(dtype)).mul_(g_kl[b, t].unsqueeze(-1))
                gc.sub_(offset[b, t].unsqueeze(-1)).mul_(p)
            gc.scatter_add_(-1, tok[b, t], g_logp[b, t].unsqueeze(-1))
            if ctx.has_bad_rows:
                # p = 0 where x = -inf, and masked rows (zero upstream gradient) may hold any
                # logits: neither gets a gradient, whatever 0 * inf made of it.
                gc.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            grad[b, t] = gc
        return grad


def token_stats(
    policy_logits: Tensor,
    ref_logits: Tensor,
    tokens: Tensor,
    *,
    kl_grad: bool = True,
    chunk_rows: int | None = None,
    inplace: bool = False,
) -> TokenStats:
    """Compute logp, logq, exact per-token KL and entropy in one chunked pass.

    Args:
        policy_logits: [B, T, V] logits of p; position t produced tokens[:, t].
        ref_logits: [B, T, V] logits of q at the same positions (never differentiated).
        tokens: [B, T] long, every id in [0, V) (callers replace padding by a valid id).
        kl_grad: make `kl` differentiable (the RB pathwise term): the reference logits are then
            kept until backward. Off, they are released after forward and `kl` is a constant.
        chunk_rows: positions (rows of V logits) processed at once.
        inplace: backward overwrites `policy_logits` with their gradient instead of allocating
            another [B, T, V] buffer. Only for logits nothing else will read, such as the fresh
            output of the LM head.
    """
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(policy_logits.shape[-1])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    logp, logq, kl, ent = _TokenStatsFunction.apply(
        policy_logits, ref_logits.detach(), tokens, kl_grad, chunk_rows, inplace
    )
    # The outputs are views of one buffer, which mark_non_differentiable does not cover.
    return TokenStats(logp=logp, logq=logq.detach(), kl=kl if kl_grad else kl.detach(), entropy=ent.detach())


# -- validated and masked: what every caller uses --------------------------------------------


def check_inputs(policy_logits: Tensor, ref_logits: Tensor, tokens: Tensor, mask: Tensor) -> None:
    """Raise a clear error for shapes, dtypes or ids that would otherwise broadcast or misindex."""
    if policy_logits.dim() != 3:
        raise ValueError(f"policy_logits must be [B, T, V], got shape {tuple(policy_logits.shape)}")
    if ref_logits.shape != policy_logits.shape:
        what = "vocabulary sizes" if ref_logits.shape[:-1] == policy_logits.shape[:-1] else "shapes"
        raise ValueError(
            f"policy_logits and ref_logits {what} differ: {tuple(policy_logits.shape)} vs "
            f"{tuple(ref_logits.shape)}; policy and reference must share one vocabulary"
        )
    if not policy_logits.is_floating_point() or not ref_logits.is_floating_point():
        raise TypeError("policy_logits and ref_logits must be floating point tensors")
    if tokens.shape != policy_logits.shape[:-1] or mask.shape != tokens.shape:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must both be [B, T] = "
            f"{tuple(policy_logits.shape[:-1])}"
        )
    if tokens.dtype != torch.long:
        raise TypeError(f"tokens must be torch.long, got {tokens.dtype}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be torch.bool, got {mask.dtype}")
    vocab = policy_logits.shape[-1]
    live = tokens[mask]
    if live.numel() and (live.min() < 0 or live.max() >= vocab):
        raise ValueError(f"tokens under the mask must lie in [0, {vocab}), the vocabulary")


def masked_token_stats(
    policy_logits: Tensor,
    ref_logits: Tensor,
    tokens: Tensor,
    mask: Tensor,
    *,
    kl_grad: bool = True,
    chunk_rows: int | None = None,
    inplace: bool = False,
) -> TokenStats:
    """`token_stats` after validation, with padding zeroed so it never changes a result.

    Masked positions never change a value or a gradient, whatever their logits (-inf, NaN).
    """
    check_inputs(policy_logits, ref_logits, tokens, mask)
    return masked_stats(
        lambda safe: token_stats(
            policy_logits, ref_logits, safe, kl_grad=kl_grad, chunk_rows=chunk_rows, inplace=inplace
        ),
        tokens,
        mask,
    )


def masked_stats(compute: Callable[[Tensor], TokenStats], tokens: Tensor, mask: Tensor) -> TokenStats:
    """`compute(tokens)` with padding tokens replaced by a valid id, checked, and zeroed on padding."""
    # Padding may hold any id (GPT-2 pads with EOS, others with -100): replace it by a valid one.
    stats = compute(tokens.masked_fill(~mask, 0))
    _check_finite(stats, mask)
    zero = torch.zeros((), dtype=stats.kl.dtype, device=mask.device)
    return TokenStats(
        logp=torch.where(mask, stats.logp, zero),
        logq=torch.where(mask, stats.logq, zero),
        kl=torch.where(mask, stats.kl, zero),
        entropy=torch.where(mask, stats.entropy, zero),
    )


def _check_finite(stats: TokenStats, mask: Tensor) -> None:
    # NaN or +inf logits poison the log-normaliser and hence logp/logq; -inf logits are allowed
    # (masked vocabulary) unless the sampled token has zero probability.
    if not torch.isfinite(stats.logp[mask]).all() or not torch.isfinite(stats.logq[mask]).all():
        raise ValueError(
            "non-finite log-probabilities: the logits contain NaN/inf, or a sampled token has "
            "zero probability under the policy or the reference"
        )
    if not torch.isfinite(stats.kl[mask]).all():
        raise ValueError("infinite KL: the reference gives zero probability to a token the policy can sample")
