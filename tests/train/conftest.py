import sys
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # fake_parts, importable by spawned workers too


@pytest.fixture
def manifest(tmp_path):
    from fake_parts import write_images

    return write_images(tmp_path / "images")
