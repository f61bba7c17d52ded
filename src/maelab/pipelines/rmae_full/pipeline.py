"""``rmae_full``: raw images -> the side-by-side table. ingest -> regions -> pre-train R-MAE and the MAE
baseline -> transfer (linear, kNN and segmentation probes, fine-tune, detection, segmentation) for both and
a random-init encoder, plus the supervised CNN reference -> report, and R-MAE's interactive segmentation.
Everything is read from parameters; the data flow orders the stages."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from maelab.pipelines import ingest, interactive, regions, report, transfer
from maelab.pipelines.pretrain.pipeline import pretrain_pipeline

PRETRAINED = ("rmae", "mae")
ENCODERS = (*PRETRAINED, "random_init", "supervised_reference")


def create_pipeline(**kwargs) -> Pipeline:
    pretrain = pretrain_pipeline("rmae", after=("regions_report",)) + pretrain_pipeline("mae")
    evaluate = transfer.create_pipeline(
        encoders=list(ENCODERS), encoder_inputs={name: f"pretrain_{name}_encoder" for name in PRETRAINED}
    )
    return (
        ingest.create_pipeline()
        + regions.create_pipeline()
        + pretrain
        + evaluate
        + report.create_pipeline(encoders=list(ENCODERS))
        + interactive.create_pipeline("rmae")
    )
