"""The one teacher interface MR-MAE mimics (Gao et al., "Mimic before Reconstruct", §3.2).

A teacher is a frozen ViT that sees the full, unmasked image (the same augmented view as the student) and
returns its patch features ``[B, L_t, C]`` on its own patch grid, plus, when asked, the CLS token's attention
to the patches of one block (§3.3 "Focused Mimicking"). Backends: CLIP through open_clip
(:mod:`maelab.teachers.clip`), DINO through timm (:mod:`maelab.teachers.dino`), a maelab encoder
(:mod:`maelab.teachers.encoder`).

Inputs. maelab images arrive in the ImageNet normalisation (``maelab.data.view``, the same constants as
timm's ``IMAGENET_DEFAULT_MEAN/STD`` used here, since models may not import ``maelab.data``); a teacher
undoes it and applies its own (CLIP's OpenAI mean/std), and resizes the image to the resolution it was
built for when the student's differs (bicubic, as the teachers' own preprocessing).

Grids. When the teacher's patch grid differs from the student's (e.g. a 224/16 = 14x14 CLIP teacher and a
64/8 = 8x8 student), :func:`resample_tokens` resamples the teacher's features to the student's grid by
bilinear interpolation of the ``[C, h_t, w_t]`` feature map (``align_corners=False``, so both grids cover
the same image extent); the CLS attention is resampled the same way and renormalised to sum to 1. Equal
grids are passed through unchanged.

Frozen: parameters never require grad, ``train()`` keeps the teacher in eval mode, and the forward runs
under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

Grid = tuple[int, int]


@dataclass(frozen=True)
class TeacherOutput:
    """features: [B, L_t, C] patch tokens in raster order on ``grid`` (no prefix tokens);
    cls_attention: [B, L_t] the CLS query's attention to the patches of the chosen block, averaged over
    heads (None unless asked)."""

    features: Tensor
    grid: Grid
    cls_attention: Tensor | None = None


class Teacher(nn.Module):
    """Base class: subclasses set ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``mean``, ``std``
    and implement ``encode(x, attention_layer)`` on images already in the teacher's normalisation."""

    img_size: Grid
    patch_size: int
    embed_dim: int
    depth: int
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    input_mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN  # what the student's images carry
    input_std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    @property
    def grid(self) -> Grid:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    def freeze(self) -> Teacher:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Teacher:  # noqa: ARG002 - a teacher never trains
        return super().train(False)

    def set_fused_attn(self, enable: bool) -> None:
        """Fused SDPA (fast) or explicit ``softmax(q k^T) v`` everywhere (FLOP counters see the matmuls)."""

    def layer_index(self, layer: int) -> int:
        if not -self.depth <= int(layer) < self.depth:
            raise IndexError(f"teacher attention layer {layer} out of range for depth {self.depth}")
        return int(layer) % self.depth

    def prepare(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in the student's normalisation -> the teacher's normalisation and resolution."""
        x = images.float()
        if (self.mean, self.std) != (self.input_mean, self.input_std):
            mean_in, std_in = _stats(self.input_mean, x), _stats(self.input_std, x)
            x = (x * std_in + mean_in - _stats(self.mean, x)) / _stats(self.std, x)
        if tuple(x.shape[-2:]) != tuple(self.img_size):
            x = F.interpolate(x, size=self.img_size, mode="bicubic", align_corners=False)
        return x

    @torch.no_grad()
    def forward(self, images: Tensor, attention_layer: int | None = None) -> TeacherOutput:
        """images [B, 3, H, W] (student normalisation) -> :class:`TeacherOutput`."""
        return self.encode(self.prepare(images), attention_layer)

    def encode(self, x: Tensor, attention_layer: int | None) -> TeacherOutput:
        raise NotImplementedError

    def dense(
        self, images: Tensor, grid: Grid, attention_layer: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Features ``[B, gh*gw, C]`` and CLS attention ``[B, gh*gw]`` (or None) on the student's ``grid``."""
        out = self(images, attention_layer)
        feats = resample_tokens(out.features, out.grid, grid)
        attn = out.cls_attention
        if attn is not None and out.grid != tuple(grid):
            attn = resample_tokens(attn.unsqueeze(-1), out.grid, grid).squeeze(-1).clamp_min(0)
            attn = attn / attn.sum(-1, keepdim=True).clamp_min(1e-12)
        return feats, attn


def _stats(values: tuple[float, ...], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def resample_tokens(tokens: Tensor, src: Grid, dst: Grid) -> Tensor:
    """[B, h*w, C] on grid ``src`` -> [B, H*W, C] on grid ``dst``: bilinear, ``align_corners=False``
    (identity when the grids are equal)."""
    src, dst = (int(src[0]), int(src[1])), (int(dst[0]), int(dst[1]))
    if src == dst:
        return tokens
    b, n, c = tokens.shape
    if n != src[0] * src[1]:
        raise ValueError(f"resample_tokens: {n} tokens do not fill a {src[0]}x{src[1]} grid")
    x = tokens.transpose(1, 2).reshape(b, c, *src).float()  # [B, C, h, w]
    x = F.interpolate(x, size=dst, mode="bilinear", align_corners=False)  # [B, C, H, W]
    return x.flatten(2).transpose(1, 2).to(tokens.dtype)  # [B, H*W, C]


def cls_attention_qkv(attn: nn.Module, x: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """[B, L] head-averaged attention of the CLS query to the patch tokens, for a timm-style attention
    module (``qkv``, ``num_heads``, ``scale``, optional ``q_norm``/``k_norm``) on its normed input ``x``
    [B, N, D]. The softmax runs over all N keys (prefix included), then the patch columns are kept."""
    b, n, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, h, N, d]
    q, k = qkv[0][:, :, :1], qkv[1]  # [B, h, 1, d], [B, h, N, d]
    q = attn.q_norm(q) if hasattr(attn, "q_norm") else q
    k = attn.k_norm(k) if hasattr(attn, "k_norm") else k
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    probs = ((q.float() * scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)  # [B, h, 1, N]
    return probs[:, :, 0, num_prefix_tokens:].mean(dim=1)  # [B, L]
