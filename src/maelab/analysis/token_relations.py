"""Token-relation metrics of self-guided MAE's analysis (Shi et al. 2024, §3 and §5.4), as pure functions.

All take one layer's tokens of a batch of images and return the batch mean (a float):

- ``feature_variance`` σ_F and ``similarity_variance`` σ_S (Eq. 3, Table 1): for unit-normalised token
  features ``x̂_i``, ``σ_F = 1/n Σ_i ||x̂_i - x̄||²`` (the square of a vector read as its squared norm; the
  per-dimension mean would put Table 1's 0.08 three orders lower) and ``σ_S`` the variance of the
  off-diagonal cosine similarities ``M_ij, i ≠ j`` around their mean (the mean over the same ``n(n-1)``
  pairs the variance uses).
- ``attention_distance`` (ViT, Dosovitskiy et al. 2021, used in §4 and Fig. 7a): the attention-weighted mean
  distance in patches between each query patch and the patches it attends to, over heads and queries; CLS
  rows and columns are left out.
- ``attention_nmi`` (Park et al. 2023, used in §4 / Fig. 6): the normalised mutual information between
  queries and keys of the joint ``p(q, k) = A_qk / n`` (uniform queries), ``I(Q; K) / sqrt(H(Q) H(K))``;
  0 for attention that is the same for every query (homogeneous), 1 for a one-to-one map.
- ``masked_token_variance`` (§5.4, Fig. 7c): the variance across an image's mask tokens of their embeddings
  at a decoder layer, averaged over the feature dimensions.
- ``relation_kl`` (Eq. 4): ``D_KL(R_j || R_N)`` of token relations, rows read as distributions: attention
  rows as they are, cosine rows through a softmax (our choice; the paper does not say how it makes ``M``
  a distribution); the mean over rows.

``relation_profile`` runs them over every encoder and decoder block of a Pretrainer and ``relation_drift``
gives Eq. 4 per encoder block between two checkpoints' relations (``encoder_relations``). The command that
runs them on checkpoints, draws the picture, writes the JSON and logs both to MLflow is
``maelab analyze relations`` (``maelab.analysis.relations``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from maelab.masking.ncut import cosine_matrix
from maelab.models.attention import record_attention
from maelab.models.heads import PixelDecoderHead


def feature_variance(x: Tensor) -> float:
    """σ_F (Eq. 3) of token features x [B, n, D]."""
    xn = F.normalize(x.float(), dim=-1)
    return float((xn - xn.mean(1, keepdim=True)).pow(2).sum(-1).mean())


def similarity_variance(x: Tensor) -> float:
    """σ_S (Eq. 3) of token features x [B, n, D]: variance of the off-diagonal cosine similarities."""
    m = cosine_matrix(x)  # [B, n, n]
    n = m.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool, device=m.device)
    vals = m[:, off]  # [B, n(n-1)]
    return float((vals - vals.mean(-1, keepdim=True)).pow(2).mean())


def attention_distance(attn: Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> float:
    """Mean attention distance in patches; attn [B, heads, P+L, P+L] over a ``grid`` of L patches."""
    p = num_prefix_tokens
    a = attn[..., p:, p:].float()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)  # the patch part of each row, renormalised
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], -1).float().to(a.device)  # [L, 2]
    dist = torch.cdist(pos, pos)  # [L, L]
    return float((a * dist).sum(-1).mean())


def attention_nmi(attn: Tensor) -> float:
    """NMI between queries and keys of attention maps attn [B, heads, n, n] (rows sum to 1)."""
    a = attn.float().clamp_min(0)
    n = a.shape[-1]
    joint = a / n  # p(q, k), uniform queries
    pk = joint.sum(-2)  # [B, h, n]: p(k)
    h_q = math.log(n)
    h_k = -(pk * pk.clamp_min(1e-12).log()).sum(-1)  # [B, h]
    mi = (joint * (a.clamp_min(1e-12) / pk.unsqueeze(-2).clamp_min(1e-12)).log()).sum((-1, -2))  # I(Q; K)
    nmi = mi / (h_q * h_k).clamp_min(1e-12).sqrt()
    return float(nmi.mean())


def masked_token_variance(x: Tensor, mask: Tensor) -> float:
    """Variance across each image's mask tokens, mean over dims; x [B, L, D] (patch tokens, raster order),
    mask [B, L] bool (True = mask token)."""
    x, m = x.float(), mask.to(x.device).unsqueeze(-1).float()  # [B, L, 1]
    count = m.sum(1).clamp_min(1.0)  # [B, 1]
    mean = (x * m).sum(1) / count  # [B, D]
    var = ((x - mean.unsqueeze(1)).pow(2) * m).sum(1) / count  # [B, D] (population variance)
    return float(var.mean())


def relation_kl(r_now: Tensor, r_final: Tensor, kind: str = "attention") -> float:
    """Eq. 4 for one layer: mean over images and rows of ``KL(R_now || R_final)``; relations [B, (h,) n, n]:
    ``attention`` rows are distributions already, ``cosine`` rows go through a softmax."""
    if kind == "cosine":
        p, q = r_now.float().softmax(-1), r_final.float().softmax(-1)
    elif kind == "attention":
        p, q = r_now.float(), r_final.float()
    else:
        raise ValueError(f"relation_kl: kind {kind!r} is unknown; choose attention or cosine")
    kl = (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1)
    return float(kl.mean())


@torch.no_grad()
def encoder_relations(model: torch.nn.Module, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """One full-image pass ``E(X)`` through every encoder block: the attention maps ``A`` [B, h, 1+L, 1+L]
    and the block outputs [B, 1+L, D] (CLS first), per block."""
    encoder = model.encoder
    blocks = list(range(encoder.depth))
    with record_attention(encoder.blocks, blocks) as maps:
        _, feats = encoder.forward_intermediates(images, None, blocks)
    return [maps[i] for i in blocks], feats


def relation_drift(
    now: tuple[list[Tensor], list[Tensor]], final: tuple[list[Tensor], list[Tensor]]
) -> dict[str, list[float]]:
    """Eq. 4, ``δ_i = mean_I KL(R_now^(i)(I) || R_final^(i)(I))`` per encoder block ``i``, for both of §3.3's
    relations: ``enc_kl_attention`` (``A``, every head's rows) and ``enc_kl_cosine`` (``M`` of the patch
    tokens, rows through a softmax); ``now`` / ``final``: ``encoder_relations`` of the same images."""
    (attn_now, feats_now), (attn_final, feats_final) = now, final
    return {
        "enc_kl_attention": [relation_kl(a, b) for a, b in zip(attn_now, attn_final, strict=True)],
        "enc_kl_cosine": [
            relation_kl(cosine_matrix(a[:, 1:]), cosine_matrix(b[:, 1:]), kind="cosine")
            for a, b in zip(feats_now, feats_final, strict=True)
        ],
    }


@torch.no_grad()
def relation_profile(
    model: torch.nn.Module,
    images: Tensor,
    plan: Any,
    relations: tuple[list[Tensor], list[Tensor]] | None = None,
) -> dict[str, list[float]]:
    """The metrics per layer of a Pretrainer, the ground for Fig. 6 / Fig. 7 / Table 1:

    - ``enc_sigma_f``, ``enc_sigma_s``, ``enc_attention_distance``, ``enc_nmi``: every encoder block on the
      full image ``E(X)`` (patch tokens, CLS left out of σ); ``relations``: ``encoder_relations`` of these
      images when the caller has them already;
    - with a pixel decoder, ``dec_sigma_f``, ``dec_sigma_s``, ``dec_masked_token_variance``: every decoder
      block in the practical setting ``D([E(X_v); m])`` with ``plan`` (a ``MaskPlan [B, L]``).
    """
    encoder = model.encoder
    enc_attn, enc_feats = relations or encoder_relations(model, images)
    out: dict[str, list[float]] = {
        "enc_sigma_f": [feature_variance(f[:, 1:]) for f in enc_feats],
        "enc_sigma_s": [similarity_variance(f[:, 1:]) for f in enc_feats],
        "enc_attention_distance": [attention_distance(a, encoder.grid) for a in enc_attn],
        "enc_nmi": [attention_nmi(a) for a in enc_attn],
    }
    if not any(isinstance(h, PixelDecoderHead) for h in getattr(model, "heads", {}).values()):
        return out
    _, head = model.pixel_head()
    captured: list[Tensor] = []
    hooks = [blk.register_forward_hook(lambda _m, _a, y: captured.append(y)) for blk in head.decoder_blocks]
    try:
        head.decode(encoder.forward_features(images, plan), plan)
    finally:
        for h in hooks:
            h.remove()
    out["dec_sigma_f"] = [feature_variance(y[:, 1:]) for y in captured]
    out["dec_sigma_s"] = [similarity_variance(y[:, 1:]) for y in captured]
    out["dec_masked_token_variance"] = [masked_token_variance(y[:, 1:], plan.mask) for y in captured]
    return out
