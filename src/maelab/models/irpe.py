"""iRPE, the "contextual product" relative position encoding on keys (Wu et al. 2021, "Rethinking and
Improving Relative Position Encoding for Vision Transformer"), as LoMaR uses it (Chen et al. 2022, §1.4
"Implementation": relative positions make the local reconstruction translation-invariant; §2.6 "RPE vs.
APE": 83.1 -> 83.5).

Written here from the paper's formulas, on top of SDPA: the bias is an additive float attention mask.

Contextual mode on keys (Wu et al. §3.2): the attention logit between query ``i`` and key ``j`` is

    e_ij = (x_i W^Q) (x_j W^K + r_ij)^T / sqrt(d)  =  q_i k_j^T / sqrt(d)  +  q_i r_ij^T / sqrt(d)

so the relative term is a bias ``b_ij = q_i . r_ij / sqrt(d)`` added to the logits. ``r_ij = p[I(i, j)]``, a
trainable vector of the head dim picked from a table ``p`` by a bucket index.

Product method (Wu et al. §3.3): ``I(i, j)`` is the pair ``(g(dy), g(dx))`` of the row and column offsets
``dy = y_i - y_j``, ``dx = x_i - x_j``, each passed through the piecewise index function

    g(x) = round(x)                                                                  if |x| <= alpha
    g(x) = sign(x) * min(beta, round(alpha + ln(|x|/alpha) / ln(gamma/alpha) * (beta - alpha)))   otherwise

exact near the query, logarithmic further away, clipped at ``beta``. Offsets then fall into
``(2 * int(beta) + 1)^2`` buckets whatever the grid, so one table serves a 7 x 7 window in pre-training and
the full grid in transfer. ``alpha : beta : gamma = 1 : 2 : 8`` with ``alpha = ratio = 1.9`` (Wu et al.'s
default ratio): beta = 3.8, 7 x 7 = 49 buckets.

As LoMaR configures it: one table per block shared across the heads, on keys only, and the prefix (CLS)
token skipped (its row and column get no bias). The table starts as a truncated normal (std 0.02).

Cost: ``q p^T`` over the buckets, ``[B, h, N, n_buckets]``, then a gather to ``[B, h, N, N]`` (the efficient
form Wu et al. §3.4 describe: the table lookup precedes the indexing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_RATIO = 1.9


def piecewise_index(rel: Tensor, alpha: float, beta: float, gamma: float) -> Tensor:
    """Wu et al. §3.3's ``g``: integer offsets [..] -> bucket offsets [..] long in [-int(beta), int(beta)]."""
    rel = rel.to(torch.float64)
    near = rel.abs() <= alpha
    far = alpha + torch.log(rel.abs().clamp_min(alpha) / alpha) / math.log(gamma / alpha) * (beta - alpha)
    far = torch.sign(rel) * torch.clamp(torch.round(far), max=beta)
    out = torch.where(near, torch.round(rel), far)
    return out.clamp(-int(beta), int(beta)).long()


def product_buckets(grid: tuple[int, int], ratio: float = DEFAULT_RATIO) -> Tensor:
    """[N, N] long bucket index of every (query, key) pair of a ``grid`` of N = gh*gw tokens in raster order:
    ``(g(dy) + B) * (2B + 1) + (g(dx) + B)`` with ``B = int(beta)`` (the product method)."""
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # [N]
    dy = piecewise_index(rows[:, None] - rows[None, :], alpha, beta, gamma)  # [N, N]
    dx = piecewise_index(cols[:, None] - cols[None, :], alpha, beta, gamma)
    side = 2 * int(beta) + 1
    return (dy + int(beta)) * side + (dx + int(beta))


class ContextualProductRPE(nn.Module):
    """iRPE contextual product on keys, one table shared across heads: ``q [B, h, P+N, d] -> bias
    [B, h, P+N, P+N]`` with ``bias_ij = q_i . p[I(i, j)] / sqrt(d)``, zero on the ``P`` prefix rows and
    columns."""

    def __init__(
        self, grid: tuple[int, int], head_dim: int, num_prefix_tokens: int = 1, ratio: float = DEFAULT_RATIO
    ) -> None:
        super().__init__()
        self.grid, self.num_prefix_tokens = (int(grid[0]), int(grid[1])), int(num_prefix_tokens)
        self.ratio, self.scale = float(ratio), head_dim**-0.5
        side = 2 * int(2 * self.ratio) + 1
        self.table = nn.Parameter(torch.empty(side * side, head_dim))  # [n_buckets, d], shared by the heads
        nn.init.trunc_normal_(self.table, std=0.02)
        self.register_buffer("buckets", product_buckets(self.grid, self.ratio), persistent=False)  # [N, N]

    def configure(self, grid: tuple[int, int], num_prefix_tokens: int) -> None:
        """The same table on another token grid and prefix (ViTDet: windows and global blocks, no CLS)."""
        grid = (int(grid[0]), int(grid[1]))
        self.num_prefix_tokens = int(num_prefix_tokens)
        if grid != self.grid or self.buckets.device != self.table.device:
            self.grid = grid
            self.buckets = product_buckets(grid, self.ratio).to(self.table.device)

    def forward(self, q: Tensor) -> Tensor:
        p = self.num_prefix_tokens
        b, h, n, _ = q.shape
        m = n - p
        if m != self.buckets.shape[0]:
            raise ValueError(
                f"iRPE: {m} tokens after the prefix, the grid {self.grid} has {self.buckets.shape[0]}"
            )
        lut = (q[:, :, p:] * self.scale) @ self.table.to(q.dtype).t()  # [B, h, M, n_buckets]
        bias = torch.gather(lut, -1, self.buckets.expand(b, h, m, m))  # [B, h, M, M]
        return F.pad(bias, (p, 0, p, 0))  # prefix (CLS) rows and columns: no bias
