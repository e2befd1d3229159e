"""One settings object: packaged defaults, then NEURODISSECT_* environment, then CLI flags.

Every field is read from the environment variable `NEURODISSECT_<FIELD>` (upper
case), except `ray_address`, which is Ray's own `RAY_ADDRESS`. The Helm chart sets
exactly these variables.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from services.common.errors import InvalidArgument
from services.common.store import ObjectStore, open_store

SERVICES = ("gateway", "extractor", "explainer", "captioner")
DEFAULT_PORTS = {"gateway": 50051, "extractor": 50052, "explainer": 50053, "captioner": 50054}
DEFAULT_METRICS_PORTS = {"gateway": 9101, "extractor": 9102, "explainer": 9103, "captioner": 9104}


@dataclass(frozen=True)
class Settings:
    """Configuration shared by every service and the CLI."""

    store_url: str = "file://./var/store"
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_secure: bool = False
    s3_region: str = ""
    # How long an object-store call retries transient failures (an outage) before failing.
    store_retry_s: float = 900.0
    ray_address: str = ""
    # Ray CPUs of a locally started Ray (0 = all cores).
    ray_num_cpus: int = 0
    host: str = "127.0.0.1"
    port: int = 0  # 0: the service's default port
    metrics_port: int = -1  # -1: the service's default metrics port; 0: disabled
    # HTTP port of the web UI, which the gateway process serves (0: not served).
    ui_port: int = 8080
    gateway_addr: str = "127.0.0.1:50051"
    extractor_addr: str = "127.0.0.1:50052"
    # Several extractor replicas that share a job's images (comma-separated host:port; the
    # first also indexes and finishes). Empty: `extractor_addr` alone.
    extractor_addrs: str = ""
    explainer_addr: str = "127.0.0.1:50053"
    captioner_addr: str = "127.0.0.1:50054"
    auth_token: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    max_concurrent_jobs: int = 2
    # A job stage whose peer streams no progress for this long is cancelled and retried,
    # up to this many times; then the job fails naming the silent peer.
    stage_no_progress_s: float = 900.0
    stage_no_progress_retries: int = 2
    max_queued_jobs: int = 100
    device: str = "cpu"
    # torch intra-op threads of an extractor (0: the cores this process may run on). Set it
    # to cores / replicas where several extractors share a machine (`up --extractors`,
    # the Helm chart from the pod's CPU limit), so they do not oversubscribe the cores.
    torch_threads: int = 0
    cache_dir: str = "./var/cache"
    # Directories user-supplied model and dataset paths must lie under (empty: anywhere).
    data_roots: str = ""
    rpc_timeout_s: float = 30.0
    log_level: str = "INFO"

    @classmethod
    def load(
        cls, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> Settings:
        """Build settings from defaults, then `env` (default os.environ), then `overrides`.

        `overrides` with value None are ignored, so CLI flags left unset fall through.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for item in fields(cls):
            name = env_name(item.name)
            if name in env:
                values[item.name] = _parse(item.name, item.type, env[name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def service_port(self, service: str) -> int:
        """The gRPC port `service` listens on."""
        return self.port or DEFAULT_PORTS[service]

    def service_metrics_port(self, service: str) -> int:
        """The HTTP metrics port of `service` (0 = disabled)."""
        return DEFAULT_METRICS_PORTS[service] if self.metrics_port < 0 else self.metrics_port

    def address_of(self, service: str) -> str:
        """The host:port clients use to reach `service`."""
        return str(getattr(self, f"{service}_addr"))

    def extractor_addresses(self) -> list[str]:
        """host:port of every extractor replica, the first one first."""
        listed = [a.strip() for a in self.extractor_addrs.split(",") if a.strip()]
        return listed or [self.extractor_addr]

    def extractor_threads(self) -> int:
        """The intra-op torch threads of an extractor: `torch_threads`, else its usable cores."""
        return self.torch_threads or usable_cores()

    def open_store(self) -> ObjectStore:
        """Open the configured object store."""
        return open_store(
            self.store_url,
            endpoint=self.s3_endpoint,
            access_key=self.s3_access_key,
            secret_key=self.s3_secret_key,
            secure=self.s3_secure,
            region=self.s3_region,
            retry_s=self.store_retry_s,
        )

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def environment(self) -> dict[str, str]:
        """These settings as the environment variables that `load` reads."""
        out = {}
        for item in fields(self):
            value = getattr(self, item.name)
            name = env_name(item.name)
            out[name] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def env_name(field: str) -> str:
    """Return the environment variable that sets settings field `field`."""
    return "RAY_ADDRESS" if field == "ray_address" else f"NEURODISSECT_{field.upper()}"


def _parse(name: str, kind: Any, raw: str) -> Any:
    kind = kind if isinstance(kind, str) else kind.__name__
    try:
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise InvalidArgument(
            f"{raw!r} is not a valid {kind}", field=env_name(name)
        ) from None
    return raw
