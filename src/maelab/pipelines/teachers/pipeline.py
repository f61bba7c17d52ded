"""The ``teachers`` pipeline: manifest -> teacher-feature store (incremental, safe to kill) + its report.

    manifest + teacher_store_previous + params:teachers + recipes + run_env
        -> compute_teacher_features -> teacher_store, teachers_report

``teacher_store_previous`` and ``teacher_store`` are the same folder (as the region store's pair): the node
adds what earlier runs did not store, shard by shard, and hands the store on to pre-training (recipes with
``data.teacher.mode: store``).
"""

from kedro.pipeline import Pipeline, node

from maelab.pipelines.teachers.nodes import compute_teacher_features


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                compute_teacher_features,
                inputs=[
                    "manifest",
                    "teacher_store_previous",
                    "params:teachers",
                    "params:recipes",
                    "params:recipe_defaults",
                    "run_env",
                ],
                outputs=["teacher_store", "teachers_report"],
                name="compute_teacher_features",
            )
        ]
    )
