"""A tiny autoregressive model whose every string can be enumerated, for exact answers.

Token 0 is EOS; tokens 1..A are symbols. A string is at most `max_len` tokens: it ends with the
first EOS, or is truncated at `max_len`. The model keeps one row of logits per prefix of symbols,
so p(. | prefix) is arbitrary and KL, its gradient and every estimator's distribution can be
computed exactly by summing over all strings.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

EOS = 0


class TabularLM:
    def __init__(self, table: Tensor, max_len: int):
        self.table = table  # [n_prefixes, V]
        self.vocab = table.shape[-1]
        self.symbols = self.vocab - 1
        self.max_len = max_len
        assert table.shape[0] == sum(self.symbols**k for k in range(max_len))

    @classmethod
    def random(cls, vocab: int, max_len: int, seed: int, scale: float = 1.0, **kw) -> TabularLM:
        n = sum((vocab - 1) ** k for k in range(max_len))
        g = torch.Generator().manual_seed(seed)
        return cls(scale * torch.randn(n, vocab, generator=g, dtype=torch.float64, **kw), max_len)

    def prefix_ids(self, tokens: Tensor) -> Tensor:
        """[B, T] -> [B, T]: the table row used at each position (the prefix before it)."""
        sym = (tokens.clamp(1, self.symbols) - 1).long()  # ids after EOS are never used
        ids = torch.zeros_like(sym)
        offset, code = 0, torch.zeros_like(sym[:, 0])
        for t in range(tokens.shape[1]):
            ids[:, t] = offset + code
            offset += self.symbols**t
            code = code * self.symbols + sym[:, t]
        return ids

    def logits(self, tokens: Tensor) -> Tensor:
        """[B, T] -> [B, T, V]: position t holds the logits that produced tokens[:, t]."""
        return self.table[self.prefix_ids(tokens)]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n strings from the model: tokens [n, max_len] (EOS-padded) and mask [n, max_len]."""
        tokens = torch.zeros(n, self.max_len, dtype=torch.long)
        alive = torch.ones(n, dtype=torch.bool)
        mask = torch.zeros(n, self.max_len, dtype=torch.bool)
        for t in range(self.max_len):
            probs = torch.softmax(self.logits(tokens)[:, t], dim=-1)
            tokens[:, t] = torch.where(alive, torch.multinomial(probs, 1, generator=generator)[:, 0], EOS)
            mask[:, t] = alive
            alive = alive & (tokens[:, t] != EOS)
        return tokens, mask

    def strings(self) -> tuple[Tensor, Tensor]:
        """Every string the model can produce: tokens [S, max_len] and mask [S, max_len]."""
        rows, masks = [], []
        for length in range(1, self.max_len + 1):
            for body in itertools.product(range(1, self.vocab), repeat=length - 1):
                rows.append(list(body) + [EOS] * (self.max_len - length + 1))
                masks.append([True] * length + [False] * (self.max_len - length))
        for body in itertools.product(range(1, self.vocab), repeat=self.max_len):
            rows.append(list(body))  # truncated at the length limit, no EOS
            masks.append([True] * self.max_len)
        return torch.tensor(rows), torch.tensor(masks)

    def log_prob(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """[S] log-probability of each string: sum of masked next-token log-probs."""
        logp = torch.log_softmax(self.logits(tokens), dim=-1)
        return (logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)


def exact_kl(p: TabularLM, q: TabularLM) -> Tensor:
    """KL(p || q) over whole strings, by enumeration (differentiable w.r.t. p.table)."""
    tokens, mask = p.strings()
    lp, lq = p.log_prob(tokens, mask), q.log_prob(tokens, mask)
    return (lp.exp() * (lp - lq)).sum()


def exact_mean_var(p: TabularLM, values: Tensor) -> tuple[float, float]:
    """Mean and variance under p of per-string values given in `p.strings()` order."""
    tokens, mask = p.strings()
    w = p.log_prob(tokens, mask).exp().detach()
    mean = (w * values).sum()
    return mean.item(), (w * (values - mean) ** 2).sum().item()
