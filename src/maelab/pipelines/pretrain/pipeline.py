"""``pretrain``: ``pretrain_pipeline("mae")`` trains the recipe ``mae`` -> ``pretrain_mae_report``
(``data/08_reporting/pretrain_mae.json``) and ``pretrain_mae_encoder`` (the encoder file's path).

``create_pipeline()`` (registered as ``pretrain``) trains the recipe named in ``params:pretrain.recipe``.
"""

from __future__ import annotations

from functools import partial, update_wrapper

from kedro.pipeline import Pipeline, node, pipeline

from maelab.pipelines.pretrain import nodes

INPUTS = ["manifest", "params:recipes", "params:recipe_defaults"]


def pretrain_pipeline(recipe_name: str, after: tuple[str, ...] = ()) -> Pipeline:
    """The pipeline that trains one named recipe (the registry adds ``pretrain_<name>`` for each).

    ``after``: datasets the run must wait for in a composed pipeline (``regions_report`` for R-MAE).
    """
    func = update_wrapper(partial(nodes.pretrain, recipe_name=recipe_name), nodes.pretrain)
    return pipeline(
        [
            node(
                func,
                [*INPUTS, *after],
                [f"pretrain_{recipe_name}_report", f"pretrain_{recipe_name}_encoder"],
                name=f"pretrain_{recipe_name}",
                tags=["pretrain"],
            )
        ]
    )


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                nodes.pretrain_configured,
                [*INPUTS, "params:pretrain.recipe"],
                ["pretrain_report", "pretrain_encoder"],
                name="pretrain",
                tags=["pretrain"],
            )
        ]
    )
