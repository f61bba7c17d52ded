"""``pretrain_<recipe>``: one pipeline per recipe in ``parameters_pretrain.yml`` (made by the registry).

    params:recipes + params:recipe_defaults -> resolve_recipe -> pretrain_<recipe>_recipe
    manifest + pretrain_<recipe>_recipe + run_env [+ region_store] [+ teacher_store] -> train
        -> pretrain_<recipe>_report, pretrain_<recipe>_encoder, pretrain_<recipe>_checkpoint,
           pretrain_<recipe>_losses

The nodes are grouped under the namespace ``pretrain_<recipe>`` (kedro viz); dataset names stay global so a
composed pipeline (``rmae_full``) connects them to regions, transfer and interactive.
"""

from __future__ import annotations

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node

from maelab.pipelines.pretrain import nodes


def create_pipeline(
    recipe: str, uses_regions: bool = False, uses_teacher_store: bool = False, **kwargs
) -> Pipeline:
    """The pipeline that trains ``recipe``; ``uses_regions``: the recipe reads the region store (R-MAE);
    ``uses_teacher_store``: it reads stored teacher features (MR-MAE, ``data.teacher.mode: store``)."""
    resolve = update_wrapper(partial(nodes.resolve, recipe_name=recipe), nodes.resolve)
    inputs = {"manifest": "manifest", "recipe": f"pretrain_{recipe}_recipe", "run_env": "run_env"}
    if uses_regions:
        inputs["region_store"] = "region_store"
    if uses_teacher_store:
        inputs["teacher_store"] = "teacher_store"
    return Pipeline(
        [
            node(
                resolve,
                ["params:recipes", "params:recipe_defaults"],
                f"pretrain_{recipe}_recipe",
                name="resolve_recipe",
            ),
            node(
                nodes.pretrain,
                inputs,
                [
                    f"pretrain_{recipe}_report",
                    f"pretrain_{recipe}_encoder",
                    f"pretrain_{recipe}_checkpoint",
                    f"pretrain_{recipe}_losses",
                ],
                name="train",
            ),
        ],
        namespace=f"pretrain_{recipe}",
        prefix_datasets_with_namespace=False,
        tags=["pretrain"],
    )
