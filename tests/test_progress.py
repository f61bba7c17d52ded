"""Progress: a tqdm bar on a terminal; elsewhere (a log file) log lines only, never bar frames."""

from __future__ import annotations

import logging
import sys

import pytest

from maelab import progress as progress_mod
from maelab.progress import LogProgress, progress, track


class _Tty:
    def __init__(self, stream, tty: bool) -> None:
        self.stream, self.tty = stream, tty

    def isatty(self) -> bool:
        return self.tty

    def __getattr__(self, name):
        return getattr(self.stream, name)


def test_no_terminal_gives_log_lines_and_no_frames(monkeypatch, capsys, caplog) -> None:
    monkeypatch.setattr(sys, "stderr", _Tty(sys.stderr, False))
    monkeypatch.setattr(progress_mod, "EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="maelab.progress")
    assert isinstance(progress(3, "scenes", "img"), LogProgress)
    assert list(track(range(3), 3, "decode", "img")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "\r" not in err and "img/s]" not in err
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == [f"decode: {i}/3 img" for i in (1, 2, 3, 3)]
    assert lines[-1].startswith("decode: 3/3 img, done in")


def test_a_terminal_gets_a_tqdm_bar(monkeypatch) -> None:
    from tqdm import tqdm

    monkeypatch.setattr(sys, "stderr", _Tty(sys.stderr, True))
    bar = progress(2, "x", disable=True)
    assert isinstance(bar, tqdm)
    bar.close()


@pytest.mark.parametrize("tty", [True, False])
def test_disabled_is_silent(monkeypatch, capsys, caplog, tty: bool) -> None:
    monkeypatch.setattr(sys, "stderr", _Tty(sys.stderr, tty))
    caplog.set_level(logging.INFO)
    assert list(track([1, 2], 2, "quiet", enabled=False)) == [1, 2]
    assert capsys.readouterr().err == "" and not caplog.records


def test_transfer_result_line() -> None:
    from maelab.pipelines.transfer.nodes import result_line

    line = result_line("mae", "linear_probe", {"top1": 20.75, "top5": 68.083, "seeds": [0]}, 12.34)
    assert line == "transfer mae / linear_probe: top1 20.75, top5 68.08 (12.3 s)"
    assert result_line("x", "seg", {}, 1.0) == "transfer x / seg: done (1.0 s)"
