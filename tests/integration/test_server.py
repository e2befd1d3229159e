"""The shared gRPC server: health, reflection, token auth, error mapping, metrics, shutdown."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from neurodissect.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from prometheus_client import REGISTRY

from services.common.client import Peer, call_metadata, open_channel, wait_healthy
from services.common.errors import InvalidArgument, NotFound
from services.common.server import ServiceServer
from services.common.settings import Settings
from tests.fixtures.ports import free_port


class _Jobs(gateway_pb2_grpc.GatewayServicer):
    """A tiny servicer: GetJob raises project errors, WatchJob streams then fails."""

    def GetJob(self, request: gateway_pb2.GetJobRequest, context: grpc.ServicerContext):  # noqa: N802
        if not request.job_id:
            raise InvalidArgument("must not be empty", field="job_id")
        if request.job_id == "boom":
            raise RuntimeError("unexpected")
        if request.job_id != "j1":
            raise NotFound(f"no job {request.job_id!r}")
        return common_pb2.Job(id="j1", state=common_pb2.SUCCEEDED)

    def WatchJob(self, request: gateway_pb2.GetJobRequest, context: grpc.ServicerContext):  # noqa: N802
        yield gateway_pb2.JobEvent(job=common_pb2.Job(id=request.job_id))
        raise NotFound("gone")


def _register(server: grpc.Server) -> list[str]:
    gateway_pb2_grpc.add_GatewayServicer_to_server(_Jobs(), server)
    return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]


def _start(token: str = "") -> tuple[ServiceServer, Settings]:
    settings = Settings(port=free_port(), metrics_port=0, auth_token=token)
    server = ServiceServer("gateway", settings, _register).start()
    return server, settings.replace(gateway_addr=f"127.0.0.1:{server.port}")


@pytest.fixture()
def open_server() -> Iterator[tuple[ServiceServer, Settings]]:
    server, settings = _start()
    yield server, settings
    server.stop(0)


def test_health_and_reflection(open_server: tuple[ServiceServer, Settings]) -> None:
    _, settings = open_server
    wait_healthy(settings.gateway_addr, settings, timeout=10)
    with open_channel(settings.gateway_addr, settings) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="neurodissect.v1.Gateway"), timeout=5
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"neurodissect.v1.Gateway", "grpc.health.v1.Health"} <= names


def _code_of(stub: gateway_pb2_grpc.GatewayStub, job_id: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id), timeout=5)
    return caught.value.code(), caught.value.details()


def test_errors_map_to_status_codes_and_metrics(
    open_server: tuple[ServiceServer, Settings],
) -> None:
    _, settings = open_server
    counter = "neurodissect_rpc_requests_total"
    before = REGISTRY.get_sample_value(
        counter, {"service": "gateway", "method": "GetJob", "code": "NOT_FOUND"}
    ) or 0.0
    with open_channel(settings.gateway_addr, settings) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        assert stub.GetJob(gateway_pb2.GetJobRequest(job_id="j1"), timeout=5).id == "j1"
        code, details = _code_of(stub, "")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("job_id:")
        assert _code_of(stub, "nope")[0] == grpc.StatusCode.NOT_FOUND
        code, details = _code_of(stub, "boom")
        assert code == grpc.StatusCode.INTERNAL and "unexpected" in details
        events = stub.WatchJob(gateway_pb2.GetJobRequest(job_id="w"), timeout=5)
        assert next(events).job.id == "w"
        with pytest.raises(grpc.RpcError) as caught:
            next(events)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    after = REGISTRY.get_sample_value(
        counter, {"service": "gateway", "method": "GetJob", "code": "NOT_FOUND"}
    )
    assert after == before + 1
    assert REGISTRY.get_sample_value(
        counter, {"service": "gateway", "method": "GetJob", "code": "OK"}
    )


def test_token_required_but_health_open() -> None:
    server, settings = _start(token="s3cret")
    try:
        with open_channel(settings.gateway_addr, settings) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetJob(gateway_pb2.GetJobRequest(job_id="j1"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetJob(
                    gateway_pb2.GetJobRequest(job_id="j1"),
                    timeout=5,
                    metadata=[("authorization", "Bearer wrong")],
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            job = stub.GetJob(
                gateway_pb2.GetJobRequest(job_id="j1"), timeout=5, metadata=call_metadata(settings)
            )
            assert job.id == "j1"
            assert Peer(stub, settings).unary("GetJob", gateway_pb2.GetJobRequest(job_id="j1")).id
        wait_healthy(settings.gateway_addr, settings.replace(auth_token=""), timeout=5)
    finally:
        server.stop(0)


def test_graceful_shutdown_turns_health_not_serving() -> None:
    server, settings = _start()
    with open_channel(settings.gateway_addr, settings) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        server.health.enter_graceful_shutdown()
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
    server.stop(0)


def _raw(settings: Settings, method: str, data: bytes, token: str = "") -> grpc.RpcError:
    """Send `data` as the request bytes of `method`; the error it gets."""
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with open_channel(settings.gateway_addr, settings) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            call(data, timeout=5, metadata=metadata)
    return caught.value


def test_undecodable_and_out_of_range_requests_are_invalid_argument(
    open_server: tuple[ServiceServer, Settings],
) -> None:
    _, settings = open_server
    error = _raw(settings, "/neurodissect.v1.Gateway/GetJob", b"\xff\xff\xff")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("request: the request is not a valid encoded message")
    # compute { batch_size: 2**32 + 5 }: protobuf alone would read 5.
    batch = common_pb2.ComputeSpec.DESCRIPTOR.fields_by_name["batch_size"].number
    inner = bytes([batch << 3]) + bytes([0x85, 0x80, 0x80, 0x80, 0x10])
    compute = common_pb2.DissectionSpec.DESCRIPTOR.fields_by_name["compute"].number
    data = bytes([compute << 3 | 2, len(inner)]) + inner
    assert common_pb2.DissectionSpec.FromString(data).compute.batch_size == 5
    error = _raw(settings, "/neurodissect.v1.Gateway/SubmitDissection", data)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("compute.batch_size: 4294967301 is outside the int32")
    stream = _raw(settings, "/neurodissect.v1.Gateway/WatchJob", b"\x0a\x09short")
    assert stream.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_undecodable_requests_without_the_token_are_unauthenticated() -> None:
    server, settings = _start(token="s3cret")
    try:
        error = _raw(settings, "/neurodissect.v1.Gateway/GetJob", b"\xff\xff\xff")
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        error = _raw(settings, "/neurodissect.v1.Gateway/GetJob", b"\xff\xff\xff", "s3cret")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)
