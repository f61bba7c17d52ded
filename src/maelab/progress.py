"""Progress that suits where it goes: a tqdm bar on a terminal; in a log file or CI, no bar frames, only
log lines (one every ``every`` seconds, and one when done with the count and the time)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("maelab.progress")
EVERY_S = 30.0


def on_terminal() -> bool:
    return sys.stderr.isatty()


class LogProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` / iteration, written as log lines."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", every: float | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every = EVERY_S if every is None else every
        self.n, self.postfix = 0, ""
        self.t0 = self.last = time.perf_counter()
        self.closed = False

    def _line(self, done: bool = False) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
        state = f"done in {time.perf_counter() - self.t0:.1f} s" if done else f"{rate:.1f} {self.unit}/s"
        return f"{self.desc}: {self.n}{of} {self.unit}, {state}{self.postfix}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            log.info(self._line())

    def set_postfix(self, **values: Any) -> None:
        self.postfix = "".join(f", {k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and self.n:
            log.info(self._line(done=True))
        self.closed = True

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    total: int | None, desc: str, unit: str = "it", enabled: bool | None = True, **tqdm_args: Any
) -> Any:
    """A bar for ``total`` items: tqdm when stderr is a terminal, else :class:`LogProgress`; ``enabled``
    False: silent (both ignore updates)."""
    if enabled is False:
        return _Silent()
    if on_terminal():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, **tqdm_args)
    return LogProgress(total, desc, unit)


def track(items: Iterable[Any], total: int | None, desc: str, unit: str = "it", **kw: Any) -> Iterator[Any]:
    """Iterate ``items`` with :func:`progress`."""
    bar = progress(total, desc, unit, **kw)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


class _Silent:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **values: Any) -> None: ...
    def close(self) -> None: ...
