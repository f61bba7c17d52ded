"""Kedro hooks: hand the run's config environment to the pipeline registry and the nodes.

``run_env`` is a catalog dataset holding the env's name (the pre-training node reads MLflow settings and
registers encoders for it). ``KEDRO_ENV`` is set as ``kedro run --env`` sets it, for sessions created in
code, so ``register_pipelines`` builds the pipelines from that env's parameters.
"""

from __future__ import annotations

import os

from kedro.framework.hooks import hook_impl
from kedro.io import MemoryDataset


class ActiveEnvHook:
    def __init__(self) -> None:
        self.env: str | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self.env = context.env
        if context.env:
            os.environ["KEDRO_ENV"] = context.env

    @hook_impl
    def after_catalog_created(self, catalog) -> None:
        catalog["run_env"] = MemoryDataset(self.env)
