"""The four services as real processes: health, reflection, a toy job, SIGKILL, hostile specs."""

from __future__ import annotations

import signal
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from neurodissect.v1 import common_pb2

from services.cli.stack import LocalStack
from services.common import keys
from services.common.client import open_channel
from services.common.settings import SERVICES
from services.common.store import LocalStore
from services.gateway.client import NeurodissectClient
from services.gateway.jobs import TERMINAL
from tests.integration.hostile_specs import HOSTILE

# Jobs of the toy world end to end on real processes (the toy models ship: nothing trains).
pytestmark = pytest.mark.timeout(1800)

SERVICE_NAMES = {
    "gateway": "neurodissect.v1.Gateway",
    "extractor": "neurodissect.v1.Extractor",
    "explainer": "neurodissect.v1.Explainer",
    "captioner": "neurodissect.v1.Captioner",
}
JOB_TIMEOUT_S = 600.0


def store_of(platform: LocalStack) -> LocalStore:
    return LocalStore(platform.settings.store_url.removeprefix("file://"))


def all_results(client: NeurodissectClient, job: common_pb2.Job) -> dict[str, list[Any]]:
    return {layer: client.results(job.id, layer) for layer in job.spec.layers}


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_is_healthy_and_listed_by_reflection(
    platform: LocalStack, service: str
) -> None:
    with open_channel(platform.address(service), platform.settings) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAMES[service]):
            answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
        listed = {s.name for s in answer.list_services_response.service}
        assert SERVICE_NAMES[service] in listed


def test_a_toy_job_completes_and_its_results_come_back(
    platform: LocalStack, reference_job: common_pb2.Job
) -> None:
    job = reference_job
    assert job.state == common_pb2.SUCCEEDED, job.error
    with NeurodissectClient(platform.settings) as client:
        described = client.describe_model(job.spec.model)
        units = {layer.name: layer.shape[0] for layer in described.layers}
        for layer in job.spec.layers:
            listed = list(client.units(job.id, layer))
            assert [u.unit for u in listed] == list(range(units[layer]))
            assert all(u.HasField("netdissect") and u.netdissect.label for u in listed)
            rows = client.results(job.id, layer)
            assert rows[0]["unit"] == 0 and "netdissect" in rows[0]
            summary = next(s for s in job.summary if s.layer == layer)
            assert summary.units == units[layer]
            assert summary.detectors == sum(u.netdissect.detector for u in listed)
    assert store_of(platform).exists(keys.report(job.id, "index.html"))


def test_gateway_killed_mid_job_resumes_to_the_same_results(
    platform: LocalStack, toy_spec: common_pb2.DissectionSpec, reference_job: common_pb2.Job
) -> None:
    with NeurodissectClient(platform.settings) as client:
        job = client.submit(toy_spec)
        for seen in client.watch(job.id):
            if seen.state == common_pb2.EXPLAINING or seen.state in TERMINAL:
                break
    platform.kill("gateway", signal.SIGKILL)
    stored = store_of(platform).get_json(keys.job(job.id))
    assert stored["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED"), "killed too late"

    platform.start_service("gateway")
    platform.wait_healthy("gateway")
    with NeurodissectClient(platform.settings) as client:
        resumed = client.wait(job.id)
        assert resumed.state == common_pb2.SUCCEEDED, resumed.error
        assert all_results(client, resumed) == all_results(client, reference_job)
        assert [s.layer for s in resumed.summary] == [s.layer for s in reference_job.summary]


def test_hostile_specs_are_refused_by_the_running_gateway(
    platform: LocalStack, toy_spec: common_pb2.DissectionSpec, reference_job: common_pb2.Job
) -> None:
    store = store_of(platform)
    with NeurodissectClient(platform.settings) as client:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while any(j.state not in TERMINAL for j in client.jobs()):
            assert time.monotonic() < deadline, "jobs still running"
            time.sleep(0.5)
        before = store.list("")
        assert len(HOSTILE) >= 15
        for case in HOSTILE:
            spec = common_pb2.DissectionSpec()
            spec.CopyFrom(toy_spec)
            case.spoil(spec)
            with pytest.raises(grpc.RpcError) as refused:
                client.submit(spec)
            assert refused.value.code() == case.code, (case.name, refused.value.details())
            assert refused.value.details().startswith(f"{case.field}:"), case.name
        assert client.get(reference_job.id).state == common_pb2.SUCCEEDED  # still serving
    assert store.list("") == before
