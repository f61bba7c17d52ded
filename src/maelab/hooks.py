"""Kedro hooks: make the run's config environment visible to code that reads config itself
(MLflow settings in the pretrain node, the registry)."""

from __future__ import annotations

import os

from kedro.framework.hooks import hook_impl


class ActiveEnvHook:
    @hook_impl
    def after_context_created(self, context) -> None:
        if context.env:
            os.environ["KEDRO_ENV"] = context.env
