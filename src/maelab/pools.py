"""Process pools whose workers die with their parent and never hold the parent's locks.

A ``ProcessPoolExecutor`` worker blocks on its task pipe; when the parent is killed with SIGKILL the worker
still holds that pipe's write end, never sees EOF and sleeps forever (PPID 1). Forked workers also inherit
every open descriptor, including a ``flock``'d lock file: an orphan then keeps the lock, and every later run
fails. :func:`worker_pool` closes both holes:

- each worker asks the kernel for SIGKILL when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``), and exits
  at once if the parent is already gone;
- each worker closes the descriptors registered with :func:`held_lock` (locks the parent took before forking).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_HELD_LOCK_FDS: set[int] = set()  # flock'd descriptors of this process; workers close their inherited copies


def die_with_parent(parent_pid: int | None) -> None:
    """Ask for SIGKILL when the parent dies; exit now if it already has (``parent_pid`` None: not checked)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent_pid is not None and os.getppid() != parent_pid:  # died before prctl took effect
        os._exit(1)


def _init_worker(parent_pid: int | None, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    die_with_parent(parent_pid)
    for fd in list(_HELD_LOCK_FDS):  # inherited by fork: the copy would keep the parent's lock alive
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCK_FDS.clear()
    if initializer is not None:
        initializer(*initargs)


def worker_pool(
    max_workers: int,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
    mp_context: str | None = None,
) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` whose workers die with this process and drop its locks (see module doc)."""
    ctx = mp.get_context(mp_context)
    # a forkserver child's parent is the fork server (which exits when we do), so its pid is not ours
    parent = None if ctx.get_start_method() == "forkserver" else os.getpid()
    return ProcessPoolExecutor(
        max_workers=max_workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(parent, initializer, initargs),
    )


@contextlib.contextmanager
def held_lock(path: str | Path, wait: bool = False) -> Iterator[None]:
    """Exclusive ``flock`` on ``path`` (created if missing), opened close-on-exec and never kept by a
    :func:`worker_pool` worker. Raises ``BlockingIOError`` when ``wait`` is False and another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        _HELD_LOCK_FDS.add(fd)
        try:
            yield
        finally:
            _HELD_LOCK_FDS.discard(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
