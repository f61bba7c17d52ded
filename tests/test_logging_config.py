"""conf/logging.yml: what `kedro run` logs with: one plain line per record, never wrapped."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_kedro_accepts_it_and_long_records_stay_one_line(capsys) -> None:
    from kedro.framework.project import LOGGING

    config = yaml.safe_load((REPO / "conf" / "logging.yml").read_text())
    classes = {h["class"] for h in config["handlers"].values()}
    assert classes == {"logging.StreamHandler"}  # no rich console: it wraps at 80 columns off a terminal
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        LOGGING.configure(config)  # Kedro's own validation (allowed classes, no factories)
        message = "transfer mae / detection: " + "x" * 300
        logging.getLogger("maelab.test").info(message)
        logging.getLogger("maelab.test").debug("hidden")
        out = capsys.readouterr().out
    finally:
        root.handlers[:], root.level = saved
    lines = [line for line in out.splitlines() if "maelab.test" in line or "x" * 20 in line]
    assert len(lines) == 1 and lines[0].endswith(message) and " INFO    maelab.test: " in lines[0]
