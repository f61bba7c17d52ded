import sys
from pathlib import Path

import pandas as pd
import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # teacher_parts

from teacher_parts import save_teacher, write_images  # noqa: E402


@pytest.fixture
def teacher_file(tmp_path: Path) -> Path:
    return save_teacher(tmp_path / "teacher.safetensors")


@pytest.fixture
def toy_manifest(tmp_path: Path) -> pd.DataFrame:
    return write_images(tmp_path / "images", 5)
