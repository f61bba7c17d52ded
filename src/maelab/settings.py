"""Kedro project settings; the config loader's arguments live in ``maelab.config``."""

from kedro.config import OmegaConfigLoader

from maelab.config import CONFIG_LOADER_ARGS
from maelab.hooks import ActiveEnvHook

CONFIG_LOADER_CLASS = OmegaConfigLoader
HOOKS = (ActiveEnvHook(),)
__all__ = ["CONFIG_LOADER_ARGS", "CONFIG_LOADER_CLASS", "HOOKS"]  # what Kedro reads
