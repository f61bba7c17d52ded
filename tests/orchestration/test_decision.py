"""The promotion rule is pure: promote only a candidate that beats the champion."""

from __future__ import annotations

import math

import pytest

from maelab.orchestration.decision import Decision, DecisionRecord, append_decision, decide, read_decisions
from maelab.orchestration.retrain import metric_from_report, report_markdown


def test_no_champion_promotes_first_version():
    d = decide(None, None, has_champion=False)
    assert d.promote and d.action == "promote" and "no champion" in d.reason


@pytest.mark.parametrize(
    ("cand", "champ", "higher", "delta", "promote"),
    [
        (0.52, 0.50, True, 0.0, True),
        (0.50, 0.50, True, 0.0, False),  # a tie keeps the champion
        (0.49, 0.50, True, 0.0, False),
        (0.505, 0.50, True, 0.01, False),  # better, but not by min_delta
        (0.52, 0.50, True, 0.01, True),
        (0.40, 0.50, False, 0.0, True),  # lower is better (a loss)
        (0.60, 0.50, False, 0.0, False),
    ],
)
def test_promote_only_if_better(cand, champ, higher, delta, promote):
    d = decide(cand, champ, higher_is_better=higher, min_delta=delta)
    assert d.promote is promote
    assert (d.candidate, d.champion) == (cand, champ)


def test_missing_metrics():
    assert not decide(None, 0.5).promote  # a candidate without the metric never replaces a champion
    assert not decide(math.nan, 0.5).promote
    d = decide(0.3, None)  # a champion without the metric is replaced
    assert d.promote and "champion has no" in d.reason


def test_decision_log_appends_json_lines(tmp_path):
    path = tmp_path / "reporting" / "retrain_decisions.jsonl"
    a = DecisionRecord.of(decide(0.6, 0.5), "maelab-mae-vit-t8-64", 2, 1, extra={"env": "base"})
    b = DecisionRecord.of(Decision(False, "x", "linear_top1", 0.1, 0.6), "maelab-mae-vit-t8-64", 3, 2)
    append_decision(a, path)
    append_decision(b, path)
    rows = read_decisions(path)
    assert [r["action"] for r in rows] == ["promote", "keep"]
    assert (
        rows[0]["candidate_version"] == 2
        and rows[0]["champion_version"] == 1
        and rows[0]["extra"]["env"] == "base"
    )
    assert "| action | **keep** |" in b.markdown()
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(ValueError, match="line 3"):
        read_decisions(path)


def test_metric_from_report_and_markdown():
    report = {
        "rows": [{"recipe": "mae", "linear_top1": 0.31}, {"recipe": "rmae", "linear_top1": 0.35, "ap": None}]
    }
    assert metric_from_report(report, "rmae", "linear_top1") == 0.35
    assert metric_from_report(report, "rmae", "finetune_top1") is None
    assert metric_from_report(report, "lomar", "linear_top1") is None
    md = report_markdown(report)
    assert "| recipe | linear_top1 | ap |" in md and "| rmae | 0.35 |  |" in md
