"""The watchdog that cancels a stage's peer stream when it brings no progress for too long."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol


class Cancellable(Protocol):
    """An in-flight call that can be cancelled (a gRPC stream)."""

    def cancel(self) -> bool:
        """Cancel the call; whether it was still running."""
        ...


class ProgressWatchdog:
    """Cancels a job's in-flight stage call that streams no progress for `limit_s` seconds.

    The job's stages arm it around each peer stream (`watching`) and touch it on
    every message (`messages` counts them). While it is paused (`pause`/`resume`, or
    `with paused():`) or `outage()` says the object store is unreachable (the peers
    then wait for it too), silence does not count, and the clock restarts afterwards.
    """

    def __init__(self, limit_s: float, outage: Callable[[], bool] = lambda: False) -> None:
        self.limit_s = limit_s
        self.outage = outage
        self.tripped = False
        self.messages = 0
        self._poll_s = min(1.0, limit_s / 4)
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._pauses = 0

    def touch(self) -> None:
        """Restart the clock."""
        with self._lock:
            self._last = time.monotonic()

    def arrived(self) -> None:
        """A progress message arrived: count it and restart the clock."""
        with self._lock:
            self.messages += 1
            self._last = time.monotonic()

    def pause(self) -> None:
        """Stop counting silence until the matching `resume`."""
        with self._lock:
            self._pauses += 1

    def resume(self) -> None:
        """Count silence again, from now."""
        with self._lock:
            self._pauses = max(0, self._pauses - 1)
            self._last = time.monotonic()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Silence inside the block does not count."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def _silent(self) -> bool:
        with self._lock:
            if self._pauses or self.outage():
                self._last = time.monotonic()
                return False
            return time.monotonic() - self._last > self.limit_s

    @contextlib.contextmanager
    def watching(self, call: Cancellable) -> Iterator[None]:
        """Cancel `call` if it goes silent before the block ends; `tripped` says it did."""
        done = threading.Event()
        self.tripped = False
        self.touch()

        def watch() -> None:
            while not done.wait(self._poll_s):
                if self._silent():
                    self.tripped = True
                    call.cancel()
                    return

        thread = threading.Thread(target=watch, name="progress-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
