"""Ingest: generate/list the sources, decode each image once, write manifest, quarantine and annotations."""

from kedro.pipeline import Pipeline, node, pipeline

from maelab.pipelines.ingest import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(nodes.prepare_sources, "params:ingest", "ingest_prepared", name="prepare_sources"),
            node(
                nodes.list_images,
                ["params:ingest", "ingest_prepared"],
                ["ingest_candidates", "ingest_annotations"],
                name="list_images",
            ),
            node(
                nodes.decode_images,
                ["ingest_candidates", "params:ingest"],
                ["ingest_decoded", "ingest_decode_stats"],
                name="decode_images",
            ),
            node(
                nodes.build_manifest,
                ["ingest_candidates", "ingest_decoded"],
                ["manifest", "ingest_quarantine"],
                name="build_manifest",
            ),
            node(nodes.pack_shards, ["manifest", "params:ingest"], "ingest_shards", name="pack_shards"),
            node(
                nodes.export_annotations,
                ["ingest_annotations", "manifest"],
                "coco_annotations",
                name="export_annotations",
            ),
            node(
                nodes.summarize,
                ["ingest_prepared", "ingest_decode_stats", "manifest", "ingest_quarantine"],
                "ingest_summary",
                name="summarize_ingest",
            ),
        ]
    )
