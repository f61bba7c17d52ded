"""Run a Kedro pipeline the way ``kedro run`` does (bootstrap + ``KedroSession``), so project hooks fire."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from maelab.config import project_root
from maelab.recipes import nest_dotted

log = logging.getLogger(__name__)


def run_kedro_pipeline(
    name: str,
    env: str | None = None,
    params: dict[str, Any] | None = None,
    project_path: str | Path | None = None,
    namespaces: list[str] | None = None,
) -> list[str]:
    """``kedro run --pipelines=NAME --env=ENV --params=...`` in-process; returns the names of free outputs.

    ``env=None`` is Kedro's default run env (``local`` over ``base``); ``"base"``: the embedded default only.
    """
    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    project = Path(project_path) if project_path else project_root()
    if not (project / "pyproject.toml").is_file():
        raise FileNotFoundError(f"not a Kedro project (no pyproject.toml): {project}")
    bootstrap_project(project)
    if name not in pipelines:
        raise KeyError(f"no Kedro pipeline {name!r} in {project}: have {sorted(pipelines)}")
    env = env or None
    t0 = time.perf_counter()
    with KedroSession.create(project_path=project, env=env, runtime_params=nest_dotted(params)) as session:
        outputs = session.run(pipeline_names=[name], namespaces=namespaces or None)
    log.info("kedro pipeline %s (env=%s) finished in %.1f s", name, env or "base", time.perf_counter() - t0)
    return sorted(outputs)
