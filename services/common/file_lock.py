"""An exclusive advisory lock on a file, for builds that several processes may start at once."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if absent) for the block's duration.

    A second process entering with the same path waits until the first leaves, so an
    expensive cached build (a trained toy model) runs once and the waiter finds it done.
    The lock is released by the kernel if the holder dies.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
