"""Bi-partitioning patches with a normalised cut and ranking them by relevance (self-guided MAE §4).

Per image, on patch features ``x [L, D]`` (batched ``[B, L, D]``):

1. ``similarity_graph``: the cosine-similarity graph ``M`` (Eq. 2). Ncut needs non-negative edge weights and
   positive degrees, which cosines do not guarantee; the paper does not say how it handles negative ones.
   ``graph`` chooses: ``clamp`` (default, ours): ``max(M_ij, eps)``, the weights kept where positive;
   ``tokencut``: TokenCut's binary graph (Wang et al. 2022, §3.2), ``1`` where ``M_ij > tau`` (0.2) else
   ``eps`` (1e-5); ``shift``: ``(M_ij + 1) / 2``, every weight kept in order.
2. ``ncut_vector``: the second-smallest generalised eigenvector ``y1`` of ``(D - M) y = λ D y`` (Shi & Malik
   2000). With ``z = D^{1/2} y`` it is the eigenvector of the second-largest eigenvalue of
   ``N = D^{-1/2} M D^{-1/2}``. Solvers: ``eigh`` (batched symmetric ``torch.linalg.eigh`` of ``N``, exact)
   or ``power`` (subspace iteration with 4 vectors on ``N + I``, the known top eigenvector ``D^{1/2} 1``
   deflated, then Rayleigh-Ritz: batched mat-mats, a thin QR and a 4 x 4 ``eigh``, for accelerators where
   batched ``eigh`` of ``L x L`` is slow; it converges as ``((1 + λ6) / (1 + λ2))^iters``). ``y1`` is
   scaled as scipy's generalised ``eigh`` (``y^T D y = 1``); its sign is arbitrary.
3. ``bipartition``: ``A = {i : y1_i >= mean(y1)}``, ``B`` the rest; the object cluster ``C`` is the side that
   holds the token with the largest ``|y1_i|`` (TokenCut's rule, §4 "Object-centric Masking").
4. ``relevance``: ``S_i = cos(x̄_C, x_i)`` with ``x̄_C`` the mean feature of ``C`` (Eq. 8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

GRAPHS = ("clamp", "tokencut", "shift")
SOLVERS = ("eigh", "power")


def cosine_matrix(x: Tensor) -> Tensor:
    """[B, L, D] -> [B, L, L] pairwise cosine similarities (Eq. 2), in fp32."""
    xn = F.normalize(x.float(), dim=-1)
    return xn @ xn.transpose(-1, -2)


def similarity_graph(x: Tensor, graph: str = "clamp", tau: float = 0.2, eps: float = 1e-5) -> Tensor:
    """[B, L, D] -> non-negative edge weights [B, L, L] (see the module docstring for ``graph``)."""
    cos = cosine_matrix(x)
    if graph == "clamp":
        return cos.clamp_min(eps)
    if graph == "tokencut":
        return torch.where(cos > tau, torch.ones_like(cos), torch.full_like(cos, eps))
    if graph == "shift":
        return ((cos + 1) / 2).clamp_min(eps)
    raise ValueError(f"masker.graph {graph!r} is unknown; choose one of {list(GRAPHS)}")


def ncut_vector(w: Tensor, solver: str = "eigh", iters: int = 100) -> Tensor:
    """[B, L, L] symmetric non-negative weights -> ``y1`` [B, L], second-smallest generalised eigenvector
    of ``(D - W) y = λ D y``, scaled so that ``y^T D y = 1``."""
    w = w.float()
    d = w.sum(-1)  # [B, L]
    d_isqrt = d.rsqrt()
    n = d_isqrt[:, :, None] * w * d_isqrt[:, None, :]  # D^-1/2 W D^-1/2, eigenvalues in [-1, 1]
    if solver == "eigh":
        z = torch.linalg.eigh(n).eigenvectors[..., -2]  # ascending: the second-largest of N
    elif solver == "power":
        z = _power_second(n, d.sqrt(), iters)
    else:
        raise ValueError(f"masker.solver {solver!r} is unknown; choose one of {list(SOLVERS)}")
    return d_isqrt * z  # y = D^-1/2 z, with y^T D y = z^T z = 1


def _power_second(n: Tensor, top: Tensor, iters: int, block: int = 4) -> Tensor:
    """Second-largest eigenvector of ``n`` [B, L, L] (eigenvalues in [-1, 1]) whose top eigenvector is
    ``top`` [B, L] (eigenvalue 1): subspace iteration with ``block`` vectors on ``N + I`` (eigenvalues in
    [0, 2]) orthogonal to ``top``, then Rayleigh-Ritz on the block (a ``block x block`` eigh)."""
    u = F.normalize(top, dim=-1).unsqueeze(-1)  # [B, L, 1]
    size, k = n.shape[-1], max(1, min(int(block), n.shape[-1] - 1))
    t = torch.linspace(0.0, math.pi, size, device=n.device, dtype=n.dtype)[:, None]
    v = torch.cos(t * torch.arange(1, k + 1, device=n.device, dtype=n.dtype)).expand(n.shape[0], size, k)
    for _ in range(max(1, int(iters))):  # fixed start and count: deterministic
        v = v - u @ (u.transpose(-1, -2) @ v)  # deflate the known top eigenvector
        v = torch.linalg.qr(v + n @ v).Q  # (N + I) V, re-orthonormalised
    v = torch.linalg.qr(v - u @ (u.transpose(-1, -2) @ v)).Q
    _, ritz = torch.linalg.eigh(v.transpose(-1, -2) @ n @ v)  # [B, k, k], ascending
    return F.normalize((v @ ritz[..., -1:]).squeeze(-1), dim=-1)


def bipartition(y: Tensor) -> Tensor:
    """[B, L] Ncut vector -> [B, L] bool, True on the object side ``C``: the side of the mean split that holds
    ``argmax |y|``. The result does not depend on the sign of ``y``."""
    side = y >= y.mean(-1, keepdim=True)  # A = {i : y_i >= mean}
    peak = y.abs().argmax(-1, keepdim=True)  # [B, 1]
    return side == side.gather(-1, peak)


def relevance(x: Tensor, cluster: Tensor) -> Tensor:
    """Eq. 8: ``S_i = cos(x̄_C, x_i)``; x [B, L, D], cluster [B, L] bool -> S [B, L] in [-1, 1]."""
    x = x.float()
    c = cluster.to(x.dtype).unsqueeze(-1)  # [B, L, 1]
    mean = (x * c).sum(1) / c.sum(1).clamp_min(1.0)  # [B, D]
    return F.cosine_similarity(x, mean.unsqueeze(1), dim=-1)
