"""Kedro project settings; the config loader's class and arguments live in ``maelab.config``."""

from maelab.config import CONFIG_LOADER_ARGS, LayeredConfigLoader
from maelab.hooks import ActiveEnvHook

CONFIG_LOADER_CLASS = LayeredConfigLoader  # conf/local over every env
HOOKS = (ActiveEnvHook(),)
__all__ = ["CONFIG_LOADER_ARGS", "CONFIG_LOADER_CLASS", "HOOKS"]  # what Kedro reads
