"""Client plumbing: channels with TLS and token, deadlines always, retries on UNAVAILABLE."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.settings import Settings

T = TypeVar("T")

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 4 << 20),
    ("grpc.max_receive_message_length", 4 << 20),
    ("grpc.keepalive_time_ms", 30_000),
]


def open_channel(address: str, settings: Settings) -> grpc.Channel:
    """Open a channel to `address`, over TLS when the settings name a CA or certificate."""
    if settings.tls_ca or settings.tls_cert:
        root = Path(settings.tls_ca or settings.tls_cert).read_bytes()
        client_pair: dict[str, bytes] = {}
        if settings.tls_ca and settings.tls_cert and settings.tls_key:
            client_pair = {
                "private_key": Path(settings.tls_key).read_bytes(),
                "certificate_chain": Path(settings.tls_cert).read_bytes(),
            }
        credentials = grpc.ssl_channel_credentials(root_certificates=root, **client_pair)
        return grpc.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)


def call_metadata(settings: Settings) -> list[tuple[str, str]]:
    """Metadata that carries the bearer token, if one is configured."""
    return [("authorization", f"Bearer {settings.auth_token}")] if settings.auth_token else []


def with_retry(
    call: Callable[[], T], attempts: int = 5, base_delay: float = 0.2, max_delay: float = 5.0
) -> T:
    """Run `call`, retrying UNAVAILABLE with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                raise
            time.sleep(min(max_delay, base_delay * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


class Peer:
    """A stub with deadlines and token applied to every call.

    `unary(name, request)` retries UNAVAILABLE; `stream(name, request)` yields the
    responses of a server stream under one (long) deadline.
    """

    def __init__(self, stub: Any, settings: Settings) -> None:
        self.stub = stub
        self.settings = settings
        self.metadata = call_metadata(settings)

    def unary(self, name: str, request: Any, timeout: float | None = None) -> Any:
        """Call a unary method with a deadline, retrying UNAVAILABLE."""
        method = getattr(self.stub, name)
        deadline = timeout or self.settings.rpc_timeout_s
        return with_retry(lambda: method(request, timeout=deadline, metadata=self.metadata))

    def stream(self, name: str, request: Any, timeout: float) -> Iterator[Any]:
        """Iterate a server stream under a deadline of `timeout` seconds."""
        method = getattr(self.stub, name)
        return iter(method(request, timeout=timeout, metadata=self.metadata))


def wait_healthy(
    address: str, settings: Settings, timeout: float = 60.0, service: str = ""
) -> None:
    """Block until `address` answers grpc.health.v1 with SERVING, or raise TimeoutError.

    `service` names the gRPC service asked for (e.g. `neurodissect.v1.Explainer`), so
    that another server listening on the same address does not pass; "" asks for the
    server as a whole.
    """
    deadline = time.monotonic() + timeout
    with open_channel(address, settings) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                what = f"{service} on {address}" if service else address
                raise TimeoutError(f"{what} not healthy after {timeout:.0f}s")
            time.sleep(0.2)
