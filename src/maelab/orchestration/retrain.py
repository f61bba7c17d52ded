"""The retraining loop's steps that need no Prefect: read the reports, compare, move aliases, record.

The Prefect flow (``pipelines/flows.py``) only sequences these around Kedro runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from maelab.orchestration import registry
from maelab.orchestration.decision import Decision, DecisionRecord, decide

# Kedro pipeline -> (its table in data/08_reporting, the Prefect artifact key the flows publish it under)
PUBLISHED_TABLES = {
    "report": ("report.json", "maelab-report"),
    "rmae_full": ("report.json", "maelab-report"),
    "compare": ("compare.json", "maelab-compare"),
}


def published_tables(pipelines: list[str]) -> list[tuple[str, str]]:
    """The distinct ``(table file, artifact key)`` that running ``pipelines`` produces."""
    return list(dict.fromkeys(PUBLISHED_TABLES[p] for p in pipelines if p in PUBLISHED_TABLES))


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err


def pretrain_result(project: str | Path, recipe: str) -> dict[str, Any]:
    """``data/08_reporting/pretrain_<recipe>.json`` with the fields the registry needs checked."""
    path = Path(project) / "data" / "08_reporting" / f"pretrain_{recipe}.json"
    result = read_json(path, "pre-training report")
    for key in ("mlflow_run_id", "encoder_path"):
        if not result.get(key):
            raise KeyError(f"{path}: field {key!r} is missing or empty")
    encoder = Path(result["encoder_path"])
    result["encoder_path"] = str(encoder if encoder.is_absolute() else Path(project) / encoder)
    return result


def metric_from_report(report: dict[str, Any], recipe: str, metric: str) -> float | None:
    """``metric`` of ``recipe``'s row in ``report.json`` (``{"rows": [{"recipe": ..., metric: ...}]}``)."""
    rows = [r for r in report.get("rows", []) if r.get("recipe") == recipe]
    values = [r.get(metric) for r in rows if isinstance(r.get(metric), int | float)]
    values = [float(v) for v in values if not math.isnan(float(v))]
    return max(values) if values else None


def report_markdown(report: dict[str, Any], title: str = "maelab report") -> str:
    """``report.json`` rows as a markdown table (the Prefect artifact)."""
    rows = report.get("rows", [])
    if not rows:
        return f"# {title}\n\n(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def compare_and_promote(
    name: str,
    version: int,
    value: float | None,
    *,
    metric: str = "linear_top1",
    higher_is_better: bool = True,
    min_delta: float = 0.0,
    env: str | None = None,
    decisions_path: str | Path | None = None,
    extra: dict[str, Any] | None = None,
) -> DecisionRecord:
    """Tag the candidate with its metric, compare with ``champion``, move the alias if it wins, record."""

    c = registry.client(env)
    if value is not None:
        registry.set_metric(name, version, metric, value, env)
    c.set_registered_model_alias(name, registry.CANDIDATE, str(version))
    champ = registry._alias_version(c, name, registry.CHAMPION)
    champ_version = None if champ is None else int(champ.version)
    if champ_version == int(version):
        # the candidate already is champion (first version, promoted at registration): nothing to compare
        decision = Decision(False, "candidate already is champion", metric, value, value)
    else:
        champ_value = None if champ is None else registry.get_metric(name, champ_version, metric, env)
        decision = decide(
            value,
            champ_value,
            metric=metric,
            has_champion=champ is not None,
            higher_is_better=higher_is_better,
            min_delta=min_delta,
        )
    if decision.promote:
        c.set_registered_model_alias(name, registry.CHAMPION, str(version))
    record = DecisionRecord.of(decision, name, version, champ_version, source="retrain", extra=extra or {})
    registry.record_decision(record, env=env, decisions_path=decisions_path)
    return record


# ----------------------------------------------------------------------------------- retries, links
def retry_params(name: str, params: dict[str, Any] | None, attempt: int) -> dict[str, Any]:
    """Kedro runtime params for ``attempt`` (1 = first) of pipeline ``name``: a retried ``pretrain_<recipe>``
    resumes from its last checkpoint (``recipes.<recipe>.train.resume``), where the first attempt starts
    afresh (a checkpoint left by an earlier retrain is not this run's)."""
    params = dict(params or {})
    if attempt > 1 and name.startswith("pretrain_"):
        params[f"recipes.{name.removeprefix('pretrain_')}.train.resume"] = True
    return params


def mlflow_ui_base(tracking_uri: str) -> str:
    """The MLflow UI to link to: the tracking server itself, else ``$MAELAB_MLFLOW_UI`` (default
    ``http://127.0.0.1:5000``, where ``mlflow ui --backend-store-uri <sqlite>`` serves)."""
    import os

    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return os.environ.get("MAELAB_MLFLOW_UI", "http://127.0.0.1:5000").rstrip("/")


def mlflow_links(run_id: str | None, model: str | None, version: int | None, env: str | None = None) -> dict:
    """UI links ``{"mlflow_run": url, "model_version": url}`` of a pre-training run and its registered
    version (whichever is known; an unreachable tracking backend gives none)."""
    links: dict[str, str] = {}
    try:
        c = registry.client(env)
        base = mlflow_ui_base(registry.tracking_uri(env))
        if run_id:
            exp = c.get_run(run_id).info.experiment_id
            links["mlflow_run"] = f"{base}/#/experiments/{exp}/runs/{run_id}"
        if model and version is not None:
            links["model_version"] = f"{base}/#/models/{model}/versions/{version}"
    except Exception:  # noqa: BLE001 - links are a convenience; the report stands without them
        return links
    return links


def report_table(
    report: dict[str, Any], links: dict[str, dict[str, str]] | None = None
) -> list[dict[str, Any]]:
    """``report.json`` rows for a Prefect table artifact: floats rounded, and per recipe its MLflow run
    and model version links (``links[recipe]``) as extra columns."""
    links = links or {}
    cols = ["mlflow_run", "model_version"] if links else []
    rows = []
    for row in report.get("rows", []):
        out = {k: _cell(v) for k, v in row.items()}
        for col in cols:
            out[col] = links.get(str(row.get("recipe")), {}).get(col, "")
        rows.append(out)
    return rows


def _cell(value: Any) -> Any:
    """A JSON-safe table cell: floats to 4 decimals, NaN as empty."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value
