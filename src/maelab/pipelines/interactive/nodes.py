"""Node of the ``interactive`` pipeline: mean IoU of R-MAE's interactive segmentation against the
prompt-union baseline, per prompt setting, and a picture of a few examples."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

from maelab.config import resolve_recipe

log = logging.getLogger(__name__)


def evaluate_interactive_segmentation(
    encoder_path: str, params: dict[str, Any], recipes: dict[str, Any], recipe_defaults: dict[str, Any]
) -> tuple[dict[str, Any], Image.Image]:
    """``encoder_path``: the pre-training node's output (its folder holds ``checkpoint.pt``)."""
    from maelab.analysis.interactive import (  # torch: imported when the node runs, not at registry
        evaluate_interactive,
        example_figure,
        model_from_checkpoint,
        scenes_samples,
    )

    name = params.get("recipe", "rmae")
    recipe = resolve_recipe({"recipes": recipes, "recipe_defaults": recipe_defaults}, name)
    checkpoint = Path(str(encoder_path).strip()).with_name("checkpoint.pt")
    model = model_from_checkpoint(recipe, checkpoint)
    samples = scenes_samples(
        params["annotations"], params["root"], model.encoder.img_size, params.get("limit")
    )
    seed, threshold = int(params.get("seed", 0)), float(params.get("threshold", 0.5))
    results = []
    for prompt in params.get("prompts") or []:
        result = evaluate_interactive(
            model,
            samples,
            prompt.get("kind", "reveal"),
            float(prompt.get("amount", 0.25)),
            prompt.get("image_visible", "prompt"),
            threshold,
            seed,
        )
        result["gain"] = result["miou"] - result["baseline_miou"]
        log.info(
            "interactive %s %s (image %s): mIoU %.3f vs baseline %.3f over %d instances",
            result["kind"],
            result["amount"],
            result["image_visible"],
            result["miou"],
            result["baseline_miou"],
            result["instances"],
        )
        results.append(result)
    shown = dict(params.get("figure") or {})
    picture = example_figure(model, samples, seed=seed, **shown)
    report = {"recipe": name, "checkpoint": str(checkpoint), "images": len(samples), "results": results}
    return report, Image.fromarray(picture)
