"""Every declared dependency is used: imported by the code, or named here with how it is used."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = {"pillow": "PIL", "scikit-image": "skimage", "pyyaml": "yaml", "open-clip-torch": "open_clip"}
NOT_IMPORTED = {
    "pyarrow": "pandas' parquet engine (manifest.parquet)",
    "kedro-datasets": "the catalog's dataset types (conf/*/catalog_*.yml)",
    "kedro-viz": "`make viz` (kedro viz run)",
    "dvc": "dvc.yaml; the DVC tests drive its CLI",
    "fastapi": "a pin for prefect's server (../shared/ENVIRONMENT.md)",
    "sqlalchemy": "a pin for prefect's server (../shared/ENVIRONMENT.md)",
}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()


def test_every_dependency_is_used() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    code = "\n".join(p.read_text() for d in ("src", "pipelines") for p in (REPO / d).rglob("*.py"))
    for name in map(_name, deps):
        if name in NOT_IMPORTED:
            continue
        module = MODULE.get(name, name.replace("-", "_"))
        pattern = rf"^\s*(import|from) {re.escape(module)}\b"
        assert re.search(pattern, code, re.MULTILINE), f"{name}: declared in pyproject.toml, never imported"
    assert not {"transformers", "torchmetrics"} & set(map(_name, deps))


def test_runs_use_pipelines_not_the_deprecated_pipeline_option() -> None:
    """Kedro 1.7 deprecates `kedro run --pipeline`: its warning must not open every `make run`."""
    for name in ("Makefile", "dvc.yaml", "README.md"):
        text = (REPO / name).read_text()
        assert "--pipelines" in text or name == "README.md"
        assert not re.search(r"--pipeline[= ]", text), name
