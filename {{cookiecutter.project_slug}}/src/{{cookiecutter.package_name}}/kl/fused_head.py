"""The per-token statistics straight from the final hidden states and the LM heads: no [B, T, V] logits.

    fused_token_stats(policy_hidden, policy_weight, ref_hidden, ref_weight, tokens, *,
                      policy_bias=None, ref_bias=None, kl_grad=True, chunk_rows=None, softcap=None)

returns what `token_stats` returns on the logits x = h_p W_p^T + b_p and y = h_q W_q^T + b_q
(with `softcap` c: c tanh(. / c) applied to both, as Gemma-2 does), but holds one chunk of
[rows, V] logits at a time: forward keeps only the hidden states and per-row log-normalisers,
and backward recomputes each chunk's logits from them (docs/estimators.md §9). The
reference's hidden width may differ from the policy's (a distillation teacher of another size
that shares the vocabulary); the reference is never differentiated.

Statistics are float32 (float64 for float64 inputs) with autocast off, as in `token_stats`. The
matmuls run in the dtype the model's own head would use: autocast's (bf16 under `bf16-mixed`) for
float32 weights when autocast is on, else the weights' dtype (bf16 weights: bf16 logits), each
with float32 accumulation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .token_stats import TokenStats, compute_dtype

# Rows per chunk by default: [rows, V] float32 buffers of 32 MiB, two of them live (three in the
# backward of a soft-capped KL). Each chunk reads the whole [V, H] weight in each of its two to six
# matmuls, so smaller chunks cost time: at shape a of benchmarks/step.py, 8 MiB chunks took 1.4x
# the op's time of 32 MiB ones.
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
    device = policy_hidden.device.type
    lowered = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
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
        lowered,
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


def _chunk_logits(
    out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, chunks: _Chunks
) -> Tensor:
    """One chunk's logits written into `out` [rows, V]; the matmul in the weights' dtype (through a
    buffer of that dtype when it is not `out`'s)."""
    product = chunks.cast(weight.dtype, out.shape[0]) if weight.dtype != out.dtype else out
    hidden = hidden.to(weight.dtype)
    if bias is None:
        torch.mm(hidden, weight.t(), out=product)
    else:
        torch.addmm(bias, hidden, weight.t(), out=product)
    if product is not out:
        out.copy_(product)
    return out if softcap is None else out.div_(softcap).tanh_().mul_(softcap)


def _logsumexp(logits: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """(log-normaliser, sum of exp(logits - max)) per row, leaving exp(logits - max) in `scratch`:
    torch.logsumexp would allocate two [rows, V] temporaries of its own."""
    peak = logits.amax(-1)
    peak = peak.masked_fill(~torch.isfinite(peak), 0)  # rows of -inf: lse -inf, as torch.logsumexp
    total = torch.sub(logits, peak[:, None], out=scratch).exp_().sum(-1)
    return peak + total.log(), total


def _dot_rows(a: Tensor, b: Tensor) -> Tensor:
    """<a_i, b_i> per row, without the [rows, V] product that linalg.vecdot allocates."""
    return torch.bmm(a[:, None], b[:, :, None]).reshape(-1)


class _Chunks:
    """[rows, V] buffers allocated once per forward or backward and reused by every chunk. Fresh
    ones per chunk cost page faults, and a heap that keeps the freed ones (glibc does, below its
    mmap threshold of at most 32 MiB) raises the process's peak by several chunks."""

    def __init__(self, count: int, rows: int, n: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.rows, self.n, self.vocab, self.device = max(1, min(rows, n)), n, vocab, device
        self.buffers = [torch.empty(self.rows, vocab, dtype=dtype, device=device) for _ in range(count)]
        self.casts: dict[torch.dtype, Tensor] = {}
        self.weight_product: Tensor | None = None

    def weight_sized(self, like: Tensor, dtype: torch.dtype) -> Tensor:
        """A [V, H] buffer for one chunk's weight gradient in a lower precision, before its sum in float32."""
        if self.weight_product is None:
            self.weight_product = torch.empty(like.shape, dtype=dtype, device=self.device)
        return self.weight_product

    def cast(self, dtype: torch.dtype, rows: int) -> Tensor:
        """A buffer for the matmul's product in bf16 (or another weight dtype) before its upcast."""
        if dtype not in self.casts:
            self.casts[dtype] = torch.empty(self.rows, self.vocab, dtype=dtype, device=self.device)
        return self.casts[dtype][:rows]

    def __iter__(self):
        """(rows of this chunk, each buffer's first rows) for every chunk."""
        for start in range(0, self.n, self.rows):
            part = slice(start, min(start + self.rows, self.n))
            yield part, [buffer[: part.stop - start] for buffer in self.buffers]


class _FusedHead(torch.autograd.Function):
    # Two [rows, V] buffers reused chunk after chunk (three in the backward of a soft-capped KL):
    # everything else is written over them in place.
    @staticmethod
    def forward(ctx, hp, wp, bp, hq, wq, bq, tokens, kl_grad, rows, softcaps, lowered):
        softcap, ref_softcap = softcaps
        dtype = compute_dtype(torch.promote_types(hp.dtype, wp.dtype))
        wp_m, bp_m, wq_m, bq_m = (_lower(t, lowered) for t in (wp, bp, wq, bq))
        n = tokens.shape[0]
        logp, logq, kl, entropy, lse_x, lse_y = (torch.empty(n, dtype=dtype, device=hp.device) for _ in range(6))
        with torch.autocast(hp.device.type, enabled=False):
            chunks = _Chunks(2, rows, n, wp.shape[0], dtype, hp.device)
            for part, (x, p) in chunks:
                token = tokens[part, None]
                _chunk_logits(x, hp[part], wp_m, bp_m, softcap, chunks)
                lse_x[part], total = _logsumexp(x, p)
                p.div_(total[:, None])  # the policy's next-token probabilities
                logp[part] = x.gather(-1, token).squeeze(-1) - lse_x[part]
                entropy[part] = lse_x[part] - _dot_rows(p, x)
                y = _chunk_logits(x, hq[part], wq_m, bq_m, ref_softcap, chunks)  # over the policy's logits
                # KL = <p, x - y> - lse(x) + lse(y) = lse(y) - <p, y> - entropy, as sum_v p_v = 1
                kl[part] = -_dot_rows(p, y) - entropy[part]
                logq[part] = y.gather(-1, token).squeeze(-1)
                lse_y[part] = _logsumexp(y, y)[0]
        kl.add_(lse_y).clamp_(min=0)  # >= 0 exactly; rounding can leave -1e-7, as in token_stats
        logq.sub_(lse_y)
        ctx.save_for_backward(hp, wp, bp, hq, wq, bq, tokens, lse_x, lse_y, kl)
        ctx.kl_grad, ctx.rows, ctx.softcaps, ctx.dtype, ctx.lowered = kl_grad, rows, softcaps, dtype, lowered
        ctx.mark_non_differentiable(logq, entropy)
        return logp, logq, kl, entropy

    @staticmethod
    def backward(ctx, g_logp, g_logq, g_kl, g_entropy):
        hp, wp, bp, hq, wq, bq, tokens, lse_x, lse_y, kl = ctx.saved_tensors
        dtype, (softcap, ref_softcap) = ctx.dtype, ctx.softcaps
        # Cast again rather than kept from forward: a [V, H] copy held between the two.
        wp_m, bp_m, wq_m, bq_m = (_lower(t, ctx.lowered) for t in (wp, bp, wq, bq))
        use_kl = ctx.kl_grad and g_kl is not None
        a = torch.zeros_like(lse_x) if g_logp is None else g_logp.to(dtype)
        k = g_kl.to(dtype) if use_kl else None
        grad_h = torch.empty_like(hp) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(wp.shape, dtype=dtype, device=wp.device) if ctx.needs_input_grad[1] else None
        needs_b = bp is not None and ctx.needs_input_grad[2]
        grad_b = torch.zeros(wp.shape[0], dtype=dtype, device=wp.device) if needs_b else None
        count = 1 + use_kl + (softcap is not None)
        with torch.autocast(hp.device.type, enabled=False):
            chunks = _Chunks(count, ctx.rows, tokens.shape[0], wp.shape[0], dtype, hp.device)
            for part, (x, *free) in chunks:
                # Recomputed from the saved hidden states and log-normalisers: log p, then p.
                _chunk_logits(x, hp[part], wp_m, bp_m, softcap, chunks)
                lse = lse_x[part, None]
                # The soft-capped logits stay for the cap's derivative; otherwise log p overwrites them.
                logp = x.sub_(lse) if softcap is None else torch.sub(x, lse, out=free.pop())
                # g = a (onehot - p) + k p (log p - log q - kl) = p ((log p - log q - kl) k - a) + a onehot
                if use_kl:
                    g = _chunk_logits(free.pop(), hq[part], wq_m, bq_m, ref_softcap, chunks).sub_(lse_y[part, None])
                    g.neg_().add_(logp).sub_(kl[part, None]).mul_(k[part, None]).sub_(a[part, None])
                    g.mul_(logp.exp_())
                else:
                    g = logp.exp_().mul_(-a[part, None])
                g.scatter_add_(-1, tokens[part, None], a[part, None])
                if softcap is not None:  # d (c tanh(z / c)) / dz = 1 - (x / c)^2 for the capped logits x
                    g.mul_(x.div_(softcap).square_().neg_().add_(1))
                g_m = _to_weight_dtype(g, wp_m, chunks)  # the matmuls' dtype, as the head's backward
                if grad_h is not None:
                    grad_h[part] = g_m @ wp_m
                if grad_w is not None and g_m is g:
                    grad_w.addmm_(g.T, hp[part].to(dtype))
                elif grad_w is not None:
                    grad_w += torch.mm(g_m.T, hp[part].to(g_m.dtype), out=chunks.weight_sized(wp, g_m.dtype))
                if grad_b is not None:
                    grad_b += g.sum(0)
        grad_w = None if grad_w is None else grad_w.to(wp.dtype)
        grad_b = None if grad_b is None else grad_b.to(bp.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def _to_weight_dtype(g: Tensor, weight: Tensor, chunks: _Chunks) -> Tensor:
    if g.dtype == weight.dtype:
        return g
    return chunks.cast(weight.dtype, g.shape[0]).copy_(g)


def _lower(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """A float32 weight in autocast's dtype, once per forward or backward (autocast casts only float32)."""
    return t if t is None or dtype is None or t.dtype != torch.float32 else t.to(dtype)
