"""Node of the ``interactive`` pipeline: mean IoU of R-MAE's interactive segmentation against the
prompt-union baseline, per prompt setting, and a picture of a few examples."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

from maelab.pipelines.coco import instances

log = logging.getLogger(__name__)


def evaluate_interactive_segmentation(
    recipe: dict[str, Any], checkpoint: str, coco_annotations: dict[str, Any], params: dict[str, Any]
) -> tuple[dict[str, Any], Image.Image]:
    """recipe / checkpoint: the pre-training run's resolved recipe and its model weights' path
    (``model.safetensors``, or a ``checkpoint.pt``);
    coco_annotations: the ingest's COCO-format annotations (``params["annotations"]`` names the partition)."""
    from maelab.analysis.interactive import (  # torch: imported when the node runs, not at registry
        evaluate_interactive,
        example_figure,
        model_from_checkpoint,
        scenes_samples,
    )

    name = recipe["name"]
    checkpoint = Path(str(checkpoint).strip())
    model = model_from_checkpoint(recipe, checkpoint)
    coco = instances(coco_annotations, params["annotations"])
    root = params.get("root") or (coco.get("info") or {}).get("maelab_root")
    if not root:
        raise ValueError(
            f"coco_annotations/{params['annotations']}: field info.maelab_root is missing (the file was not "
            "written by ingest); set interactive.root to the images' folder"
        )
    samples = scenes_samples(coco, root, model.encoder.img_size, params.get("limit"))
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
