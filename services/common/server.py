"""The gRPC server every service runs on.

It registers grpc.health.v1 and server reflection, checks an optional bearer token
(UNAUTHENTICATED without it; health stays open for probes), serves TLS when given
certificates, decodes requests strictly (bytes that are no valid message, out-of-range
32-bit integers and deep nesting are INVALID_ARGUMENT, see request_decoding), maps the
project's errors to status codes, counts every RPC in the
`neurodissect_rpc_*` metrics, and shuts down gracefully: health turns NOT_SERVING
first, then in-flight calls get a grace period.
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.errors import InvalidArgument, NeurodissectError, Unauthenticated
from services.common.metrics import RPC_DURATION, RPC_REQUESTS, serve_metrics
from services.common.request_decoding import decode
from services.common.settings import Settings

log = logging.getLogger(__name__)

_OPEN_METHODS = ("/grpc.health.v1.Health/",)


class _Undecodable:
    """Stands in for a request whose bytes were refused; the handler answers with `error`."""

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def _strict(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer` that returns _Undecodable instead of raising (which gRPC answers INTERNAL)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return decode(deserializer, data)
        except InvalidArgument as exc:
            return _Undecodable(exc)

    return deserialize


def _abort_code(context: grpc.ServicerContext) -> str:
    code = context.code()  # type: ignore[attr-defined]
    return code.name if isinstance(code, grpc.StatusCode) else "OK"


class _ServiceInterceptor(grpc.ServerInterceptor):
    """Auth, error mapping and metrics around every handler."""

    def __init__(self, service: str, token: str) -> None:
        self.service = service
        self.token = token

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        needs_token = bool(self.token) and not details.method.startswith(_OPEN_METHODS)
        if needs_token:
            supplied = dict(details.invocation_metadata or ()).get("authorization", "")
            if not hmac.compare_digest(str(supplied), f"Bearer {self.token}"):
                return self._deny(handler, method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                request_deserializer=_strict(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method),
                request_deserializer=_strict(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _deny(self, handler: Any, method: str) -> Any:
        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            RPC_REQUESTS.labels(self.service, method, "UNAUTHENTICATED").inc()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(Unauthenticated(
                "missing or invalid bearer token in the 'authorization' metadata")))

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                deny,
                request_deserializer=_strict(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            deny,
            request_deserializer=_strict(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _finish(self, method: str, started: float, code: str) -> None:
        RPC_REQUESTS.labels(self.service, method, code).inc()
        RPC_DURATION.labels(self.service, method).observe(time.monotonic() - started)

    def _fail(self, context: grpc.ServicerContext, exc: Exception, method: str) -> None:
        if isinstance(exc, NeurodissectError):
            context.abort(exc.code, str(exc))
        log.exception("%s.%s failed", self.service, method)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    def _unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            try:
                if isinstance(request, _Undecodable):
                    raise request.error
                response = behavior(request, context)
            except Exception as exc:
                try:
                    if not isinstance(exc, grpc.RpcError) or _abort_code(context) == "OK":
                        self._fail(context, exc, method)
                    raise
                finally:
                    self._finish(method, started, _abort_code(context))
            self._finish(method, started, _abort_code(context))
            return response

        return call

    def _stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.monotonic()
            try:
                if isinstance(request, _Undecodable):
                    raise request.error
                yield from behavior(request, context)
            except Exception as exc:
                try:
                    if not isinstance(exc, grpc.RpcError) or _abort_code(context) == "OK":
                        self._fail(context, exc, method)
                    raise
                finally:
                    self._finish(method, started, _abort_code(context))
            self._finish(method, started, _abort_code(context))

        return call


class ServiceServer:
    """A started gRPC server with health, reflection, auth, TLS and metrics."""

    def __init__(
        self,
        service: str,
        settings: Settings,
        register: Callable[[grpc.Server], list[str]],
        max_workers: int = 16,
    ) -> None:
        self.service = service
        self.settings = settings
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=service),
            interceptors=[_ServiceInterceptor(service, settings.auth_token)],
            options=[
                ("grpc.max_send_message_length", 4 << 20),
                ("grpc.max_receive_message_length", 4 << 20),
                ("grpc.so_reuseport", 0),
                # Clients ping every 30 s during long streams (client.py); accept that.
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        names = register(self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.names = names
        address = f"{settings.host}:{settings.service_port(service)}"
        if settings.tls_cert and settings.tls_key:
            credentials = grpc.ssl_server_credentials(
                [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
                root_certificates=Path(settings.tls_ca).read_bytes() if settings.tls_ca else None,
                require_client_auth=bool(settings.tls_ca),
            )
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"{service}: cannot listen on {address}")
        self._stopped = threading.Event()
        # Set when stopping begins: what a service watches may go away from then on.
        self.stopping = threading.Event()

    def start(self) -> ServiceServer:
        """Start serving and mark every service SERVING."""
        self.server.start()
        serve_metrics(self.settings.service_metrics_port(self.service), host=self.settings.host)
        for name in ["", *self.names]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s listening on %s:%d", self.service, self.settings.host, self.port)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Turn health NOT_SERVING, then stop with `grace` seconds for in-flight calls."""
        self.stopping.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self._stopped.set()

    def wait(self) -> None:
        """Block until SIGTERM or SIGINT, then stop gracefully."""
        def on_signal(signum: int, frame: Any) -> None:
            threading.Thread(target=self.stop, daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self._stopped.wait()
