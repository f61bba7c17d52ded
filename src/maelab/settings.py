"""Kedro project settings."""

from kedro.config import OmegaConfigLoader

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # one file per stage: catalog_ingest.yml, parameters_pretrain.yml, ...
    "config_patterns": {
        "catalog": ["catalog*", "catalog*/**"],
        "parameters": ["parameters*", "parameters*/**"],
        "mlflow": ["mlflow*", "mlflow*/**"],
    },
    # conf/imagenet may override one leaf of a recipe without restating the rest
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
}

from maelab.hooks import ActiveEnvHook  # noqa: E402

HOOKS = (ActiveEnvHook(),)
