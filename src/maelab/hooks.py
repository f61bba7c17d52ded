"""Kedro hooks: make the run's config environment visible to code that reads config itself
(MLflow settings in the pretrain node, the registry), and check every parameter key before any node runs."""

from __future__ import annotations

import os

from kedro.framework.hooks import hook_impl

from maelab.schema import check_parameters


class ActiveEnvHook:
    @hook_impl
    def after_context_created(self, context) -> None:
        if context.env:
            os.environ["KEDRO_ENV"] = context.env
        check_parameters(context.params)  # --params included: a typo stops the run before any work
