"""The promotion rule of the retraining loop, and the log every decision goes to.

``decide`` is pure: the registry and the Prefect flow gather the numbers, it says promote or keep.
Every decision, automatic or manual, becomes one JSON line in ``data/08_reporting/retrain_decisions.jsonl``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from maelab.files import atomic_write_text

DECISIONS_FILE = "data/08_reporting/retrain_decisions.jsonl"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: str
    candidate: float | None
    champion: float | None

    @property
    def action(self) -> str:
        return "promote" if self.promote else "keep"


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def decide(
    candidate: float | None,
    champion: float | None,
    *,
    metric: str = "linear_top1",
    has_champion: bool = True,
    higher_is_better: bool = True,
    min_delta: float = 0.0,
) -> Decision:
    """Promote the candidate only if it beats the champion on ``metric`` by more than ``min_delta``.

    No champion at all: promote (the first version of a model becomes champion). A candidate without
    the metric is never promoted over an existing champion; a champion without it is replaced.
    """
    if not has_champion:
        return Decision(True, "no champion yet", metric, candidate, champion)
    if _missing(candidate):
        return Decision(False, f"candidate has no {metric}", metric, None, champion)
    if _missing(champion):
        return Decision(True, f"champion has no recorded {metric}", metric, candidate, None)
    gain = (candidate - champion) if higher_is_better else (champion - candidate)
    better = "higher" if higher_is_better else "lower"
    if gain > min_delta:
        return Decision(
            True,
            f"{metric} {candidate:.4g} vs {champion:.4g}: {better} by {gain:.4g}",
            metric,
            candidate,
            champion,
        )
    return Decision(
        False,
        f"{metric} {candidate:.4g} vs {champion:.4g}: not {better} by more than {min_delta:g}",
        metric,
        candidate,
        champion,
    )


@dataclass
class DecisionRecord:
    """One line of the decision log."""

    model: str
    candidate_version: int
    champion_version: int | None
    action: str
    reason: str
    metric: str
    candidate_value: float | None = None
    champion_value: float | None = None
    source: str = "retrain"  # retrain | register | manual
    extra: dict[str, Any] = field(default_factory=dict)
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @classmethod
    def of(cls, decision: Decision, model: str, candidate_version: int, champion_version: int | None, **kw):
        return cls(
            model=model,
            candidate_version=int(candidate_version),
            champion_version=None if champion_version is None else int(champion_version),
            action=decision.action,
            reason=decision.reason,
            metric=decision.metric,
            candidate_value=decision.candidate,
            champion_value=decision.champion,
            **kw,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def markdown(self) -> str:
        rows = [
            ("model", self.model),
            ("action", f"**{self.action}**"),
            ("reason", self.reason),
            ("candidate version", self.candidate_version),
            ("champion version (before)", self.champion_version),
            (f"candidate {self.metric}", self.candidate_value),
            (f"champion {self.metric}", self.champion_value),
            ("source", self.source),
            ("time", self.time),
        ]
        return "\n".join(["| field | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def append_decision(record: DecisionRecord, path: str | Path) -> Path:
    """Append one JSON line; the file is rewritten atomically so a crash never truncates the log."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    return atomic_write_text(path, old + record.to_json() + "\n")


def read_decisions(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {i} is not JSON: {err}") from err
    return out
