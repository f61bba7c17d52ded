"""Orchestration helpers: Kedro runs through a session, promotion decisions (for pipelines/flows.py)."""

from maelab.orchestration.decision import Decision, DecisionRecord, append_decision, decide, read_decisions
from maelab.orchestration.kedro_run import run_kedro_pipeline

__all__ = ["Decision", "DecisionRecord", "append_decision", "decide", "read_decisions", "run_kedro_pipeline"]
