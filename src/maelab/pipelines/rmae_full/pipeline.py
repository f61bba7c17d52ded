"""``rmae_full``: raw images -> the side-by-side table, every stage joined by catalog datasets:

    ingest -> manifest, coco_annotations
    regions -> region_store -> pretrain_<recipe> for every recipe among the compared encoders
    pretrain_<recipe>_encoder -> transfer (linear, kNN and segmentation probes, fine-tune, detection,
    segmentation; the supervised CNN reference as an encoder of its own) -> report
    pretrain_<interactive recipe>_recipe / _checkpoint + coco_annotations -> interactive

The registry passes the encoders (``rmae_full.encoders`` in the parameters), which of them are recipes,
and the pre-training pipelines built from the recipes.
"""

from __future__ import annotations

from kedro.pipeline import Pipeline

from maelab.pipelines import ingest, interactive, regions, report, transfer


def create_pipeline(
    encoders: list[str],
    pretrain: dict[str, Pipeline],
    transfer_params: dict,
    interactive_recipe: str | None = "rmae",
    **kwargs,
) -> Pipeline:
    """``pretrain``: recipe name -> its pipeline; the encoders that are recipes are pre-trained here."""
    trained = [name for name in encoders if name in pretrain]
    pipe = ingest.create_pipeline() + regions.create_pipeline()
    for name in trained:
        pipe += pretrain[name]
    pipe += transfer.create_pipeline(
        encoders, transfer_params, encoder_inputs={name: f"pretrain_{name}_encoder" for name in trained}
    )
    pipe += report.create_pipeline(encoders)
    if interactive_recipe:
        if interactive_recipe not in trained:
            raise ValueError(
                f"parameters interactive.recipe: {interactive_recipe!r} is not pre-trained in rmae_full "
                f"(rmae_full.encoders that are recipes: {trained})"
            )
        pipe += interactive.create_pipeline(interactive_recipe)
    return pipe
