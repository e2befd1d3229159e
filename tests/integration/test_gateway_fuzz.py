"""Property-based fuzzing of the gateway API over real gRPC (Hypothesis).

A real gateway (with the stand-in peers of gateway_fakes) gets generated specs, valid
and mutated at every numeric limit, byte garbage on every method, random values in
every request field, and sequences of submit / cancel / watch / results calls. The
invariants, checked after every call:

- no reply has status UNKNOWN or INTERNAL (a user's input is never a server error);
- a refused SubmitDissection writes nothing to the store;
- the server stays healthy (grpc.health.v1 SERVING);
- every accepted job reaches a terminal state.

`make test` runs a small derandomized budget; `make fuzz` a long random one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st
from neurodissect.v1 import common_pb2, gateway_pb2

from services.common.client import open_channel
from services.gateway.jobs import TERMINAL
from tests.fixtures.fuzzing import examples, mutated, mutations
from tests.integration.gateway_fakes import FakeWorld, fake_spec

SERVER_ERRORS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
TERMINAL_WAIT_S = 60.0
GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
METHODS = [m.name for m in GATEWAY.methods]
REQUEST_TYPES = {m.name: m.input_type for m in GATEWAY.methods}
_DATA_PREFIXES = ("jobs/", "results/", "reports/", "probe/", "acts/", "embed/")


class Harness:
    """One gateway on loopback, raw and typed calls, and the invariants."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world
        self.channel = open_channel(world.settings.gateway_addr, world.settings)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.accepted: list[str] = []

    def close(self) -> None:
        self.channel.close()

    def stored(self) -> set[str]:
        return {k for k in self.world.store.list("") if k.startswith(_DATA_PREFIXES)}

    def call(self, method: str, request: bytes, stream: bool = False) -> tuple[Any, Any]:
        """(response or responses, error code or None) of a raw call."""
        path = f"/{GATEWAY.full_name}/{method}"
        try:
            if stream:
                call = self.channel.unary_stream(path)
                return list(call(request, timeout=10)), None
            return self.channel.unary_unary(path)(request, timeout=30), None
        except grpc.RpcError as exc:
            assert exc.code() not in SERVER_ERRORS, (method, exc.code(), exc.details())
            return None, exc.code()

    def typed(self, method: str, request: Message) -> tuple[Any, Any]:
        stream = GATEWAY.methods_by_name[method].server_streaming
        raw, code = self.call(method, request.SerializeToString(), stream)
        output = message_factory.GetMessageClass(GATEWAY.methods_by_name[method].output_type)
        if raw is None:
            return None, code
        return ([output.FromString(r) for r in raw] if stream else output.FromString(raw)), code

    def submit(self, spec: common_pb2.DissectionSpec) -> common_pb2.Job | None:
        """Submit; a refusal must store nothing, an accepted job must end."""
        before = self.stored()
        job, _ = self.typed("SubmitDissection", spec)
        if job is None:
            assert self.stored() == before, ("a refused submit wrote", self.stored() - before)
            return None
        self.accepted.append(job.id)
        return job

    def settle(self) -> None:
        """Every accepted job reaches a terminal state, and the server is healthy."""
        deadline = time.monotonic() + TERMINAL_WAIT_S
        for job_id in self.accepted:
            while True:
                job, code = self.typed("GetJob", gateway_pb2.GetJobRequest(job_id=job_id))
                assert code is None, code
                if job.state in TERMINAL:
                    break
                assert time.monotonic() < deadline, f"job {job_id} stuck in {job.state}"
                time.sleep(0.05)
        status = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    world = FakeWorld(tmp_path_factory.mktemp("fuzz"))
    for name in ("extractor", "explainer", "captioner"):
        world.start_peer(name)
    world.start_gateway(max_queued_jobs=1000)
    harness = Harness(world)
    try:
        yield harness
    finally:
        harness.close()
        world.close()


SPEC = fake_spec(layers=("conv1",))


@examples(20)
@given(changes=mutations(SPEC))
def test_mutated_specs(harness: Harness, changes: list[tuple[str, Any]]) -> None:
    harness.submit(mutated(SPEC, changes))
    harness.settle()


@examples(30)
@given(method=st.sampled_from(METHODS), data=st.binary(max_size=200))
def test_byte_garbage_on_every_method(harness: Harness, method: str, data: bytes) -> None:
    before = harness.stored()
    _, code = harness.call(method, data, GATEWAY.methods_by_name[method].server_streaming)
    if code is not None and method == "SubmitDissection":
        assert harness.stored() == before
    harness.settle()


@examples(30)
@given(data=st.data(), method=st.sampled_from([m for m in METHODS if m != "SubmitDissection"]))
def test_random_values_in_every_request_field(
    harness: Harness, data: st.DataObject, method: str
) -> None:
    template = message_factory.GetMessageClass(REQUEST_TYPES[method])()
    request = mutated(template, data.draw(mutations(template)))
    harness.typed(method, request)
    harness.settle()


_OPS = st.sampled_from(["submit", "submit_cancel", "cancel", "get", "watch", "units", "unit"])


@examples(6)
@given(ops=st.lists(st.tuples(_OPS, st.integers(0, 20), st.sampled_from(["conv1", "conv2", ""])),
                    min_size=1, max_size=6))
def test_sequences_of_calls(harness: Harness, ops: list[tuple[str, int, str]]) -> None:
    mine: list[str] = []
    for op, number, layer in ops:
        job_id = mine[number % len(mine)] if mine else f"{number:016x}"
        if op in ("submit", "submit_cancel"):
            job = harness.submit(fake_spec(layers=("conv1", "conv2"), name=f"seq {number}"))
            assert job is not None
            mine.append(job.id)
            if op == "submit_cancel":
                harness.typed("CancelJob", gateway_pb2.GetJobRequest(job_id=job.id))
        elif op == "cancel":
            harness.typed("CancelJob", gateway_pb2.GetJobRequest(job_id=job_id))
        elif op == "get":
            harness.typed("GetJob", gateway_pb2.GetJobRequest(job_id=job_id))
        elif op == "watch":
            harness.settle()
            events, _ = harness.typed("WatchJob", gateway_pb2.GetJobRequest(job_id=job_id))
            if events:
                assert events[-1].job.state in TERMINAL
        elif op == "units":
            harness.typed("ListUnits", gateway_pb2.ListUnitsRequest(
                job_id=job_id, layer=layer, unit_start=number // 2, unit_end=number))
        else:
            harness.typed("GetUnit", gateway_pb2.GetUnitRequest(
                job_id=job_id, layer=layer, unit=number))
    harness.settle()
