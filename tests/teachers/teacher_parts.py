"""Test parts for the teacher store: a tiny maelab-encoder teacher saved to a file, and small asymmetric
images with their manifest (imported by tests here and in tests/pipelines)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from maelab.data.manifest import conform
from maelab.files import save_safetensors
from maelab.models.vit import build_encoder

TEACHER_ENC = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def save_teacher(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    enc = build_encoder(TEACHER_ENC)
    return save_safetensors(path, enc.state_dict(), {"encoder_config": json.dumps(TEACHER_ENC)})


def write_images(folder: Path, n: int, hw: tuple[int, int] = (40, 48), seed: int = 0) -> pd.DataFrame:
    """``n`` PNGs: a bright block on the left, a gradient, noise (left and right differ) + manifest rows."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = np.zeros((*hw, 3), np.float64)
        img += np.linspace(0, 200, hw[1])[None, :, None] * rng.uniform(0.3, 1.0, 3)
        y = rng.integers(0, hw[0] - 12)
        img[y : y + 12, 2:14] = rng.integers(0, 256, 3)
        img = np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)
        name = f"{i:03d}.png"
        Image.fromarray(img).save(folder / name)
        rows.append(
            {
                "image_id": f"toy:train:{i}",
                "source": "toy",
                "split": "train",
                "root": str(folder),
                "path": name,
                "width": hw[1],
                "height": hw[0],
                "content_hash": f"{seed}-{i}",
            }
        )
    return conform(pd.DataFrame(rows))
