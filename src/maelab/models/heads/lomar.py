"""LoMaR's head and loss (Chen et al. 2022, §1.4 "Architecture" and "Implementation").

The encoder sees every one of a window's ``K x K`` tokens in raster order, the masked ones replaced by its
mask token, the ``B * n`` windows as the batch, each with its own CLS (``maelab.models.vit``, a
``WindowPlan`` from ``maelab.masking.window``). This head drops the CLS, maps every token from the
encoder's final norm to its ``p*p*C`` pixels with one linear layer (the paper's "simple MLP head"; §1.4
"Architecture": no MAE decoder, Fig. 2), and takes the MSE against per-patch normalised pixels (norm-pix,
as MAE) on the masked window tokens only.

Output ``[B, n*K*K, p*p*C]``: window after window, raster order inside a window (the plan's token order).

Fig. 4's alternative, ``decoder: {embed_dim, depth, num_heads}`` with ``window: K``: an MAE-style asymmetric
encoder-decoder inside each window. The encoder (built without ``mask_token``) sees only a window's visible
tokens; MAE's pixel decoder (``PixelDecoderHead`` on the ``K x K`` window grid, window-local sin-cos
positions) puts mask tokens back and predicts every token. The paper finds the simple encoder better, more
so for small windows (§2.6 "Architecture").
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from maelab.masking.plan import MaskPlan
from maelab.models.heads.base import Head
from maelab.models.heads.pixel import (
    NORM_PIX_EPS,
    PixelDecoderHead,
    masked_mse,
    normalize_patches,
    patchify,
    unpatchify,
)
from maelab.models.vit import EncoderSpec, gather_tokens, init_linear_norm


class LomarHead(Head):
    """``latent [B*n, 1+K*K, D]`` -> ``pred [B, n*K*K, p*p*C]``; norm-pix MSE on the masked window tokens."""

    def __init__(
        self,
        spec: EncoderSpec,
        norm_pix_loss: bool = True,
        decoder: dict[str, Any] | None = None,
        window: int | None = None,
    ) -> None:
        super().__init__(spec)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.pred: nn.Linear | None = None
        self.decoder: PixelDecoderHead | None = None
        if decoder:  # Fig. 4: MAE's decoder inside each K x K window
            if not window:
                raise ValueError("heads.<lomar>.decoder needs heads.<lomar>.window (the masker's window K)")
            wspec = replace(spec, grid=(int(window), int(window)))
            self.decoder = PixelDecoderHead(wspec, norm_pix_loss=norm_pix_loss, **decoder)
        else:
            self.pred = nn.Linear(spec.embed_dim, spec.patch_size**2 * spec.in_chans)
            self.apply(init_linear_norm)

    def plan_needs(self) -> dict[str, str]:
        """Traits the masker's plan must have (checked by ``maelab.models.compat``)."""
        return {"windows": "LoMaR predicts each window's tokens from the window plan (masker type: window)"}

    def window_ids(self, plan: MaskPlan) -> Tensor:
        ids = getattr(plan, "window_ids", None)
        if ids is None:
            raise ValueError("the lomar head needs a window plan (masker type: window)")
        return ids  # [B, n, K*K]

    def target(self, image: Tensor, plan: MaskPlan) -> Tensor:
        """[B, C, H, W] -> [B, n*K*K, p*p*C]: every window token's pixels (per-patch normalised if
        ``norm_pix_loss``), in the plan's token order."""
        ids = self.window_ids(plan)
        patches = patchify(image.float(), self.spec.patch_size)  # [B, L, p*p*C]
        target = gather_tokens(patches, ids.reshape(ids.shape[0], -1))  # [B, n*K*K, p*p*C]
        return normalize_patches(target)[0] if self.norm_pix_loss else target

    def forward(
        self, latent: Tensor, plan: MaskPlan, batch: dict[str, Any], intermediates: dict[int, Tensor]
    ) -> tuple[Tensor, Tensor]:
        b, n, kk = self.window_ids(plan).shape
        if self.decoder is not None:  # visible tokens in, every window token out (CLS dropped inside)
            pred = self.decoder.decode(latent, plan.per_window()).reshape(b, n * kk, -1)
        elif latent.shape[:2] != (b * n, 1 + kk):
            raise ValueError(
                f"lomar head: encoder output {tuple(latent.shape)} is not {b * n} windows of 1+{kk} tokens; "
                "the encoder needs mask_token: true and window_size: K"
            )
        else:
            pred = self.pred(latent[:, 1:]).reshape(b, n * kk, -1)  # drop each window's CLS
        with torch.autocast(pred.device.type, enabled=False):  # target and loss in fp32
            loss = masked_mse(pred.float(), self.target(batch["image"], plan), plan.mask)
        return loss, pred

    @torch.no_grad()
    def window_pictures(self, image: Tensor, pred: Tensor, plan: MaskPlan) -> tuple[Tensor, Tensor, Tensor]:
        """For the reconstruction grid (Fig. 6: the sampled window, masked, reconstructed): each window's
        pixels ``[B*n, C, Kp, Kp]``, its reconstruction (norm-pix predictions mapped back with each target
        patch's mean and std) and its mask ``[B*n, K*K]``."""
        ids = self.window_ids(plan)
        b, n, kk = ids.shape
        k, p, c = int(round(kk**0.5)), self.spec.patch_size, self.spec.in_chans
        raw = gather_tokens(patchify(image.float(), p), ids.reshape(b, -1))  # [B, n*K*K, p*p*C]
        rec = pred.float()
        if self.norm_pix_loss:
            _, mean, var = normalize_patches(raw)
            rec = rec * (var + NORM_PIX_EPS) ** 0.5 + mean
        windows = unpatchify(raw.reshape(b * n, kk, -1), p, (k, k), c)
        recon = unpatchify(rec.reshape(b * n, kk, -1), p, (k, k), c)
        return windows, recon, plan.mask.reshape(b * n, kk)
