"""A tiny stand-in for ``maelab.models.build_pretrainer`` (a model with its own ``masker``) with the
same interface, so the engine can be tested on its own. Importable by spawned processes: tests put
this folder on ``sys.path`` (child processes inherit it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor, nn

from maelab.masking.plan import MaskPlan


class FakeMasker:
    in_step = False

    def __init__(self, grid: tuple[int, int], ratio: float = 0.75) -> None:
        self.grid, self.ratio = grid, ratio

    def __call__(self, generator: torch.Generator | None = None, context: Any = None) -> MaskPlan:
        return MaskPlan.from_noise(torch.rand(self.grid[0] * self.grid[1], generator=generator), self.ratio)


@dataclass
class Out:
    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)


class FakeEncoder(nn.Module):
    def __init__(self, patch: int, dim: int, num: int) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, num, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class FakePretrainer(nn.Module):
    """Patchify -> keep visible -> MLP -> pixel regression of masked patches (MAE-like loss)."""

    def __init__(self, recipe: dict[str, Any]) -> None:
        super().__init__()
        enc = recipe["encoder"]
        self.p = enc["patch_size"]
        num = (enc["img_size"] // self.p) ** 2
        self.masker = FakeMasker((enc["img_size"] // self.p,) * 2, recipe["masker"].get("ratio", 0.75))
        dim = enc["embed_dim"]
        self.encoder = FakeEncoder(self.p, dim, num)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder = nn.Linear(dim, 3 * self.p * self.p)
        self.nan_at = recipe.get("fake_nan_at")  # test hook: make the loss nan from this call on
        self.calls = 0

    def no_weight_decay(self) -> set[str]:
        return {"encoder.pos", "mask_token"}

    def patchify(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.p
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)  # [B, L, p*p*3]

    def forward(self, batch: dict[str, Any]) -> Out:
        self.calls += 1
        plan: MaskPlan = batch["plan"]
        target = self.patchify(batch["image"])  # [B, L, P]
        e = self.encoder
        tok = e.embed(target) + e.pos  # [B, L, D]
        keep = torch.gather(tok, 1, plan.ids_keep[..., None].expand(-1, -1, tok.shape[-1]))
        keep = keep + e.mlp(e.norm(keep))
        b, num = plan.mask.shape
        full = torch.cat([keep, self.mask_token.expand(b, num - keep.shape[1], -1)], 1)
        full = torch.gather(full, 1, plan.ids_restore[..., None].expand(-1, -1, full.shape[-1]))
        pred = self.decoder(full)  # [B, L, P]
        per_patch = ((pred - target) ** 2).mean(-1)
        loss = (per_patch * plan.mask).sum() / plan.mask.sum()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return Out(loss, {"pixel": loss}, {"pixel": pred})

    def reconstruct(self, batch: dict[str, Any], out: Out) -> Tensor:
        pred = out.outputs["pixel"]
        b, num, _ = pred.shape
        g = int(num**0.5)
        x = pred.reshape(b, g, g, self.p, self.p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, 3, g * self.p, g * self.p)


def build_pretrainer(recipe: dict[str, Any]) -> FakePretrainer:
    return FakePretrainer(recipe)


def tiny_recipe(**train: Any) -> dict[str, Any]:
    return {
        "name": "tiny",
        "encoder": {
            "img_size": 32,
            "patch_size": 8,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "mlp_ratio": 2.0,
        },
        "masker": {"type": "random", "ratio": 0.75},
        "heads": {
            "pixel": {"type": "pixel_decoder", "weight": 1.0, "embed_dim": 32, "depth": 1, "num_heads": 2}
        },
        "data": {"sources": ["scenes"], "splits": ["train"], "crop_scale": [0.2, 1.0], "num_workers": 0},
        "train": {
            "steps": 6,
            "batch_size": 4,
            "accum_steps": 1,
            "blr": 1.5e-4,
            "lr": 1e-3,
            "min_lr": 0.0,
            "warmup_steps": 2,
            "weight_decay": 0.05,
            "betas": [0.9, 0.95],
            "clip_grad": None,
            "precision": "fp32",
            "compile": False,
            "devices": 1,
            "seed": 0,
            "ckpt_every": 3,
            "log_every": 1,
            "image_every": 0,
            "device": "cpu",
            **train,
        },
    }


def write_images(root: Path, n: int = 12, size: tuple[int, int] = (40, 48), seed: int = 0) -> pd.DataFrame:
    """``n`` random-blob PNGs under ``root`` and their manifest rows."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        base = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize(size[::-1], Image.BILINEAR)
        img.save(root / f"img{i:03d}.png")
        rows.append(
            {
                "image_id": f"scenes:train:{i}",
                "source": "scenes",
                "split": "train",
                "root": str(root),
                "path": f"img{i:03d}.png",
                "width": size[1],
                "height": size[0],
                "content_hash": str(i),
            }
        )
    from maelab.data.manifest import conform

    return conform(pd.DataFrame(rows))


def join_gloo_rank(rank: int, world: int, port: int) -> None:
    """The torchrun environment of ``rank`` of ``world`` on 127.0.0.1:``port``, one thread per rank."""
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)


def train_rank(rank: int, world: int, port: int, manifest: pd.DataFrame, recipe: dict, out: str,
               build_model: Any, **train_kwargs: Any) -> None:  # fmt: skip
    """One rank of a gloo run of ``build_model``'s pretrainer; ``train_kwargs`` go to ``engine.train``."""
    from maelab.train import distributed
    from maelab.train.engine import train

    join_gloo_rank(rank, world, port)
    try:
        train(recipe, manifest, out_dir=out, mlflow={"enabled": False}, build_model=build_model,
              progress=False, **train_kwargs)  # fmt: skip
    finally:
        distributed.cleanup()


def ddp_worker(rank: int, world: int, port: int, manifest: pd.DataFrame, recipe: dict, out: str) -> None:
    """One rank of a gloo DDP run of the fake pretrainer (``torch.multiprocessing.spawn`` target)."""
    train_rank(rank, world, port, manifest, recipe, out, build_pretrainer)


def real_worker(
    rank: int,
    world: int,
    port: int,
    manifest: pd.DataFrame,
    recipe: dict,
    out: str,
    resume: bool = False,
    stop_after: int | None = None,
) -> None:
    """One rank of a gloo run of the real (tiny) ViT pretrainer, any ``train.strategy``."""
    from maelab.models import build_pretrainer as build_real

    train_rank(rank, world, port, manifest, recipe, out, build_real, resume=resume, stop_after=stop_after)
