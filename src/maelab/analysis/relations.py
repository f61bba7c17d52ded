"""``maelab analyze relations``: self-guided MAE's token-relation analysis (Shi et al. 2024, §3, §5.4) of
one or more pre-training checkpoints, as a JSON, a picture and (with a tracking URI) an MLflow run.

Per checkpoint, on the same images (``--images``: a folder or files, ``--limit`` of them, sorted), the
metrics of ``maelab.analysis.token_relations`` per block: σ_F and σ_S (Eq. 3), attention distance and the
query-key NMI of the encoder on the full image ``E(X)``; σ_F, σ_S and the masked-token variance of the pixel
decoder in the practical setting ``D([E(X_v); m])``, with one random plan at the recipe's mask ratio
(seeded by ``--seed``). With two or more checkpoints, given in training order, the last is the reference
``R_N`` of Eq. 4: ``enc_kl_attention`` and ``enc_kl_cosine`` of every earlier one (Fig. 3b; the last one's
are 0).

    maelab analyze relations --checkpoint data/06_models/pretrain/sgmae/checkpoint.pt \\
        --images data/01_raw/scenes/images/val --limit 16 --out data/08_reporting/relations \\
        --tracking-uri sqlite:///mlruns/mlflow.db

A checkpoint is a training ``checkpoint.pt`` (the recipe it names is loaded from ``--env``'s config; a
resolved recipe dict in it is used as it is) or a safetensors file of a whole Pretrainer's state dict (then
``--recipe`` names the recipe); ``--recipe`` always wins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maelab.analysis.token_relations import encoder_relations, relation_drift, relation_profile
from maelab.files import atomic_write_bytes, atomic_write_text, torch_load_weights

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
JSON_NAME, PICTURE_NAME = "relations.json", "relations.png"
# what the picture draws, per block: (key, title)
PANELS = (
    ("enc_sigma_f", "encoder σ_F (Eq. 3)"),
    ("enc_sigma_s", "encoder σ_S (Eq. 3)"),
    ("enc_attention_distance", "encoder attention distance (patches)"),
    ("enc_nmi", "encoder query-key NMI"),
    ("dec_sigma_f", "decoder σ_F"),
    ("dec_sigma_s", "decoder σ_S"),
    ("dec_masked_token_variance", "decoder masked-token variance"),
    ("enc_kl_attention", "Eq. 4 KL to the last checkpoint, A"),
    ("enc_kl_cosine", "Eq. 4 KL to the last checkpoint, M"),
)


def image_files(paths: list[str], limit: int) -> list[Path]:
    """Image files from folders (sorted, not recursive) and single files, the first ``limit``."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--images {p}: no such file or folder")
    if not files:
        raise ValueError(f"--images {paths}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files[:limit]


def checkpoint_recipe(path: Path, recipe: str | None, env: str | None) -> tuple[dict[str, Any], int | None]:
    """The recipe for ``path`` (``--recipe`` wins, else the one a training checkpoint carries), its step."""
    from maelab.config import load_recipe

    step = None
    if path.suffix != ".safetensors":
        state = torch_load_weights(path)
        step = state.get("step") if isinstance(state, dict) else None
        saved = state.get("recipe") if isinstance(state, dict) else None
        if recipe is None and isinstance(saved, dict):  # a resolved recipe
            return saved, step
        if recipe is None and isinstance(saved, str):  # the engine saves the recipe's name
            recipe = saved
        if recipe is None:
            raise ValueError(f"{path}: no 'recipe' field in the checkpoint; name it with --recipe")
    if recipe is None:
        raise ValueError(f"{path}: a safetensors file carries no recipe; name it with --recipe")
    return load_recipe(recipe, env), step


def analyze(
    checkpoints: list[Path],
    images: torch.Tensor,
    recipe: str | None = None,
    env: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The metrics of every checkpoint on ``images`` [B, 3, H, W]; see the module docstring."""
    from maelab.analysis.interactive import model_from_checkpoint
    from maelab.masking import MaskPlan

    runs: list[dict[str, Any]] = []
    final = None
    for path in reversed(checkpoints):  # the last first: it is Eq. 4's reference
        spec, step = checkpoint_recipe(path, recipe, env)
        model = model_from_checkpoint(spec, path)
        ratio = float(spec.get("masker", {}).get("ratio", 0.75))
        g = torch.Generator().manual_seed(seed)
        num_patches = model.encoder.grid[0] * model.encoder.grid[1]
        plan = MaskPlan.from_noise(torch.rand(images.shape[0], num_patches, generator=g), ratio)
        rel = encoder_relations(model, images)
        metrics = relation_profile(model, images, plan, relations=rel)
        if len(checkpoints) > 1:
            final = rel if final is None else final
            metrics.update(relation_drift(rel, final))
        runs.append({"checkpoint": str(path), "step": step, "recipe": spec.get("name"), "metrics": metrics})
        del model, rel
    return {"images": int(images.shape[0]), "seed": seed, "checkpoints": runs[::-1]}


def picture(result: dict[str, Any]) -> bytes:
    """A PNG: one panel per metric, the block on x, one line per checkpoint."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [(k, t) for k, t in PANELS if any(k in c["metrics"] for c in result["checkpoints"])]
    cols = 3
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, keys, strict=False):
        for c in result["checkpoints"]:
            if key in c["metrics"]:
                values = c["metrics"][key]
                label = f"step {c['step']}" if c["step"] is not None else Path(c["checkpoint"]).name
                ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("block", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"token relations on {result['images']} images (Shi et al. 2024, §3 / §5.4)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def log_to_mlflow(
    result: dict[str, Any], out: Path, tracking_uri: str, experiment: str, run_name: str = "analyze-relations"
) -> str | None:
    """One MLflow run: the JSON and the picture as artifacts (``relations/``), and the last checkpoint's
    metrics as ``relations/<key>`` with the block as the step. Returns the run id (None if tracking failed:
    the tracker warns once)."""
    from maelab.train.tracking import Tracker

    tracker = Tracker({"tracking_uri": tracking_uri, "experiment": experiment})
    last = result["checkpoints"][-1]
    run_id = tracker.start(run_name, {"checkpoints": [c["checkpoint"] for c in result["checkpoints"]]})
    for key, values in last["metrics"].items():
        for block, value in enumerate(values):
            tracker.log_metrics({f"relations/{key}": value}, block)
    tracker.log_artifact(out / JSON_NAME, "relations")
    tracker.log_artifact(out / PICTURE_NAME, "relations")
    tracker.end("FINISHED")
    return run_id if tracker.enabled else None


def relations_cli(args: argparse.Namespace) -> int:
    from maelab.analysis.interactive import load_image

    checkpoints = [Path(c) for c in args.checkpoint]
    for c in checkpoints:
        if not c.is_file():
            raise SystemExit(f"--checkpoint {c}: no such file")
    spec, _ = checkpoint_recipe(checkpoints[-1], args.recipe, args.env)
    size = spec["encoder"]["img_size"]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    files = image_files(args.images, args.limit)
    images = torch.stack([load_image(f, hw) for f in files])  # [B, 3, H, W]
    torch.manual_seed(args.seed)
    result = analyze(checkpoints, images, args.recipe, args.env, args.seed)
    result["image_files"] = [str(f) for f in files]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / JSON_NAME, json.dumps(result, indent=1))
    atomic_write_bytes(out / PICTURE_NAME, picture(result))
    run_id = None
    if args.tracking_uri:
        run_id = log_to_mlflow(result, out, args.tracking_uri, args.experiment)
    summary = {k: float(np.mean(v)) for k, v in result["checkpoints"][-1]["metrics"].items()}
    print(json.dumps({"out": str(out), "mlflow_run_id": run_id, "mean_over_blocks": summary}))
    return 0
