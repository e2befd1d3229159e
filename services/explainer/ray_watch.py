"""Whether the explainer's Ray cluster answers, followed without importing Ray.

`RayWatch` probes the cluster's endpoint every second: the explainer's health
follows it, and a cluster this process was connected to that stops accepting
connections (its head died; a restarted head is a new cluster) is reported lost,
so the explainer exits and its supervisor starts it afresh instead of hanging.

Ray itself is imported (by `sharding`) with the explainer's first job: until then
the process has not joined any cluster, and the watch probes the configured
address only.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections.abc import Callable

from services.common.settings import Settings

log = logging.getLogger(__name__)

# How often `RayWatch` probes the cluster, and how long one probe may take.
RAY_PROBE_S = 1.0
RAY_PROBE_TIMEOUT_S = 2.0


def ray_connected() -> bool:
    """Whether this process started or joined a Ray (False while no job imported Ray).

    The first job may be importing Ray on another thread: a module without its
    `is_initialized` yet has not connected either.
    """
    is_initialized = getattr(sys.modules.get("ray"), "is_initialized", None)
    return is_initialized is not None and bool(is_initialized())


def ray_endpoint(settings: Settings) -> tuple[str, int] | None:
    """host, port that answer for the Ray cluster: the client server, else the GCS.

    None while a local Ray is not started yet.
    """
    address = settings.ray_address.removeprefix("ray://")
    if ray_connected() and not settings.ray_address.startswith("ray://"):
        address = str(sys.modules["ray"].get_runtime_context().gcs_address)
    if ":" not in address:
        return None
    host, port = address.rsplit(":", 1)
    return host, int(port)


class RayWatch:
    """Probes the Ray cluster's endpoint on a daemon thread.

    After each probe `on_status(reachable)` is called. When a cluster this process
    is connected to refuses connections, `on_lost(reason)` is called once: its head
    is gone, and a head started again on the same port is a new cluster that the
    old driver cannot use.
    """

    def __init__(
        self,
        endpoint: Callable[[], tuple[str, int] | None],
        connected: Callable[[], bool],
        on_status: Callable[[bool], None],
        on_lost: Callable[[str], None],
        interval_s: float = RAY_PROBE_S,
    ) -> None:
        self.endpoint = endpoint
        self.connected = connected
        self.on_status = on_status
        self.on_lost = on_lost
        self.interval_s = interval_s
        self._stop = threading.Event()

    def start(self) -> RayWatch:
        """Start probing."""
        threading.Thread(target=self._loop, name="ray-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop probing."""
        self._stop.set()

    def probe(self) -> bool:
        """Probe once, report, and return whether the cluster answered (no endpoint: True)."""
        endpoint = self.endpoint()
        if endpoint is None:
            self.on_status(True)
            return True
        try:
            with socket.create_connection(endpoint, timeout=RAY_PROBE_TIMEOUT_S):
                pass
        except ConnectionRefusedError:
            self.on_status(False)
            if self.connected():
                self._stop.set()
                self.on_lost(f"the Ray cluster at {endpoint[0]}:{endpoint[1]} refuses "
                             "connections: its head is gone")
            return False
        except OSError as exc:
            log.warning("Ray at %s:%d unreachable: %s", *endpoint, exc)
            self.on_status(False)
            return False
        self.on_status(True)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.probe()
