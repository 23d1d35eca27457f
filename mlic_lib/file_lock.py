"""One process at a time on a folder: an advisory lock file, taken without waiting.

``mlic data prepare`` holds ``$MLIC_DATA/downloads/.lock`` (two runs would append to one partial download) and
``mlic book`` holds ``_build/.lock`` (two builds would execute into the same notebook copies and restage
``_build/src`` under each other). The lock is ``flock`` on POSIX: the kernel releases it when the process ends,
however it ends, so a killed run never leaves a stale lock behind. Where ``fcntl`` is missing (Windows) there is
no lock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class Busy(RuntimeError):
    """Another process holds the lock."""


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, busy: str) -> Iterator[None]:
    """Hold the lock file ``path`` (created, with its folder, if missing) for the ``with`` block, or raise
    :class:`Busy` with the message ``busy`` at once when another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(busy) from None
        yield
