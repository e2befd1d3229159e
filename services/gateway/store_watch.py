"""The gateway's view of the object store's health, for jobs and clients to see outages.

`StoreWatch` probes the store every `interval_s` seconds in a daemon thread (each
probe is one request, no retries). While the store is unreachable, every job that is
not terminal shows "waiting for the object store … (since …)" as its current stage's
message in GetJob, ListJobs and WatchJob (the job itself cannot be written then), and
submissions fail fast with UNAVAILABLE instead of waiting for the store.
"""

from __future__ import annotations

import logging
import threading
import time

from neurodissect.v1 import common_pb2

from services.common.errors import StoreError, Unavailable
from services.common.store import ObjectStore
from services.gateway.jobs import TERMINAL

log = logging.getLogger(__name__)


class StoreWatch:
    """Probes an object store in the background; says since when it has been unreachable."""

    def __init__(self, store: ObjectStore, interval_s: float = 2.0) -> None:
        self.store = store
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StoreWatch:
        """Start probing in a daemon thread."""
        self._thread = threading.Thread(target=self._probe_loop, name="store-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop probing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 10)

    def _probe_loop(self) -> None:
        reachable = True
        while not self._stop.wait(self.interval_s):
            try:
                answered = self.store.probe()
            except StoreError as exc:  # the store answers, but refuses: not an outage
                log.error("object store probe: %s", exc)
                continue
            if answered != reachable:
                reachable = answered
                if answered:
                    log.warning("the object store %s answers again", self.store.url)
                else:
                    log.warning("the object store %s is unreachable", self.store.url)

    def outage_started(self) -> float | None:
        """Wall-clock time (epoch seconds) the current outage began, or None if there is none."""
        since = self.store.outage_since
        if since is None:
            return None
        return time.time() - (time.monotonic() - since)

    def waiting_message(self) -> str:
        """'waiting for the object store URL (since HH:MM:SS UTC)', or '' when it answers."""
        started = self.outage_started()
        if started is None:
            return ""
        clock = time.strftime("%H:%M:%S UTC", time.gmtime(started))
        return f"waiting for the object store {self.store.url} (since {clock})"

    def check_reachable(self) -> None:
        """Raise Unavailable naming the store when it is in an outage."""
        message = self.waiting_message()
        if message:
            raise Unavailable(f"{message.replace('waiting for', 'cannot reach')}; try again later")

    def decorate(self, job: common_pb2.Job) -> common_pb2.Job:
        """`job`, with its current stage's message saying it waits for the store if it does."""
        message = self.waiting_message()
        if not message or job.state in TERMINAL:
            return job
        if job.stages:
            job.stages[-1].message = message
        else:
            job.stages.add(stage="queue", message=message)
        return job
