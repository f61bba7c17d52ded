"""Where the project lives; no Kedro, so every layer may ask."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def project_root() -> Path:
    """The Kedro project root: ``$MAELAB_PROJECT_ROOT``, the cwd if it holds ``conf/``, else the checkout."""
    env = os.environ.get("MAELAB_PROJECT_ROOT")
    if env:
        return Path(env)
    cwd = Path.cwd()
    return cwd if (cwd / "conf" / "base").is_dir() else PROJECT_ROOT
