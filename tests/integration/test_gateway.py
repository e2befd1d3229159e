"""The gateway over real gRPC, driving stand-in peers: stages, resume, queue, cancel, auth."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from neurodissect.v1 import common_pb2
from prometheus_client import REGISTRY

from services.common import keys
from services.gateway.jobs import TERMINAL
from tests.integration.gateway_fakes import FAKE_LAYERS, FakeWorld, fake_row, fake_spec
from tests.integration.hostile_specs import HOSTILE


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def state_of(world: FakeWorld, job_id: str) -> int:
    with world.client() as client:
        return client.get(job_id).state


def test_a_job_runs_every_stage_and_its_results_merge(world: FakeWorld) -> None:
    world.start_gateway()
    with world.client() as client:
        job = client.submit(fake_spec(layers=("conv1", "conv2", "fc")))
        assert job.state == common_pb2.QUEUED
        job = client.wait(job.id)
        assert job.state == common_pb2.SUCCEEDED, job.error
        stages = {s.stage: s for s in job.stages}
        assert set(stages) == {"extract", "explain", "caption", "report"}
        assert all(s.done == s.total > 0 for s in stages.values())
        assert stages["explain"].total == sum(FAKE_LAYERS.values()) * 4

        summary = {s.layer: s for s in job.summary}
        assert summary["conv1"].units == 6
        assert summary["conv1"].detectors == 3  # even units
        assert summary["conv1"].unique_labels == 3
        assert summary["conv1"].simulation_mean["netdissect"] == pytest.approx(0.035)
        assert summary["fc"].dead_units == 1
        assert math.isfinite(summary["fc"].simulation_mean["linear"])

        rows = client.results(job.id, "conv2")
        assert [r["unit"] for r in rows] == list(range(10))
        assert set(rows[3]) == {"unit", "netdissect", "compositional", "clip_dissect", "linear",
                                "milan", "simulation"}
        assert rows[3]["netdissect"]["label"] == fake_row("conv2", "netdissect", 3)["label"]
        assert rows[3]["milan"]["caption"] == "a conv2-label0 thing"
        assert rows[3]["netdissect"]["detector"] is False  # defaults are shown too

        unit = client.unit(job.id, "conv2", 7)
        assert unit.linear.explanation == fake_row("conv2", "linear", 7)["explanation"]
        assert [u.unit for u in client.units(job.id, "conv1", detectors_only=True)] == [0, 2, 4]
        assert [u.unit for u in client.units(job.id, "conv1", min_iou=0.05)] == [4, 5]
        assert len(list(client.units(job.id, "conv1", label="sky"))) == 6
        assert [u.unit for u in client.units(job.id, "conv2", unit_start=8)] == [8, 9]

        with pytest.raises(grpc.RpcError) as missing:
            client.unit(job.id, "conv3", 0)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert "conv1" in missing.value.details()

    simulated = [r for r in world.behaviour.embedded if r.texts]
    assert simulated and "a conv1-label0 thing" in simulated[0].texts
    assert "sky" in simulated[0].texts
    # The REPORTING stage stored the static copy of the pages (the fake thumbnails are
    # no images, so its unit pages show no exemplars).
    assert "SUCCEEDED" in world.store.get(keys.report(job.id, "index.html")).decode()
    assert "conv2-label1" in world.store.get(keys.report(job.id, "layer-conv2.html")).decode()
    unit_page = world.store.get(keys.report(job.id, "unit-conv2-3.html")).decode()
    assert fake_row("conv2", "linear", 3)["explanation"] in unit_page


def test_every_progress_and_transition_is_persisted_and_watched(world: FakeWorld) -> None:
    world.behaviour.block_delay_s = 0.02
    world.start_gateway()
    with world.client() as client:
        job = client.submit(fake_spec())
        seen = [(j.state, tuple((s.stage, s.done) for s in j.stages)) for j in client.watch(job.id)]
    states = [s for s, _ in seen]
    assert states == sorted(states) and states[-1] == common_pb2.SUCCEEDED
    assert common_pb2.EXPLAINING in states
    explain_done = [dict(p).get("explain") for _, p in seen if "explain" in dict(p)]
    assert len(set(explain_done)) > 3  # several progress updates of the explain stage
    stored = world.store.get_json(keys.job(job.id))
    assert stored["state"] == "SUCCEEDED"


def test_idempotency_key_returns_the_existing_job(world: FakeWorld) -> None:
    world.start_gateway()
    with world.client() as client:
        first = client.submit(fake_spec(idempotency_key="nightly-1"))
        again = client.submit(fake_spec(idempotency_key="nightly-1"))
        assert again.id == first.id
        with pytest.raises(grpc.RpcError) as clash:
            client.submit(fake_spec(layers=("conv1",), idempotency_key="nightly-1"))
        assert clash.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "idempotency_key" in clash.value.details()
        client.wait(first.id)
        assert [j.id for j in client.jobs()] == [first.id]


def test_queue_with_concurrency_limit_one(world: FakeWorld) -> None:
    world.behaviour.gate.clear()
    world.start_gateway(max_concurrent_jobs=1)
    with world.client() as client:
        first = client.submit(fake_spec(name="first"))
        second = client.submit(fake_spec(name="second"))
        wait_until(lambda: state_of(world, first.id) == common_pb2.EXPLAINING, what="first runs")
        time.sleep(0.3)
        assert client.get(second.id).state == common_pb2.QUEUED
        assert REGISTRY.get_sample_value("neurodissect_queue_length") == 1
        assert REGISTRY.get_sample_value("neurodissect_jobs", {"state": "QUEUED"}) == 1
        progress = {"job_id": first.id, "stage": "extract"}
        assert REGISTRY.get_sample_value("neurodissect_job_progress_ratio", progress) == 1.0
        world.behaviour.gate.set()
        assert client.wait(first.id).state == common_pb2.SUCCEEDED
        assert client.wait(second.id).state == common_pb2.SUCCEEDED
    assert REGISTRY.get_sample_value("neurodissect_queue_length") == 0
    assert REGISTRY.get_sample_value("neurodissect_job_progress_ratio", progress) is None
    order = [call.job_id for call in world.behaviour.explain_calls]
    assert order == sorted(order, key=lambda j: j != first.id)  # every call of the first first


def test_cancel_stops_the_in_flight_rpc(world: FakeWorld) -> None:
    world.behaviour.gate.clear()
    world.start_gateway(max_concurrent_jobs=1)
    with world.client() as client:
        running = client.submit(fake_spec())
        queued = client.submit(fake_spec(name="queued"))
        wait_until(lambda: state_of(world, running.id) == common_pb2.EXPLAINING)
        assert client.cancel(queued.id).state == common_pb2.CANCELLED
        cancelled = client.cancel(running.id)
        assert cancelled.state == common_pb2.CANCELLED
        assert cancelled.error == "cancelled by the user"
        wait_until(lambda: world.behaviour.cancelled_calls >= 1, what="the explainer to notice")
        world.behaviour.gate.set()
        time.sleep(0.3)
        assert client.get(running.id).state == common_pb2.CANCELLED
        assert client.get(queued.id).state == common_pb2.CANCELLED
        assert client.cancel(running.id).state == common_pb2.CANCELLED  # idempotent
    assert world.behaviour.computed == []
    assert world.behaviour.extract_calls == 1  # the queued job never started


def test_an_unavailable_peer_is_retried_not_failed(world: FakeWorld) -> None:
    world.stop_peer("explainer")
    world.start_gateway()
    with world.client() as client:
        job = client.submit(fake_spec())
        wait_until(lambda: state_of(world, job.id) == common_pb2.EXPLAINING)
        time.sleep(1.5)
        assert client.get(job.id).state == common_pb2.EXPLAINING
        world.start_peer("explainer")
        assert client.wait(job.id).state == common_pb2.SUCCEEDED


def test_a_stage_failure_fails_the_job_with_its_message(world: FakeWorld) -> None:
    world.behaviour.fail_explain = "conv2"
    world.start_gateway()
    with world.client() as client:
        job = client.wait(client.submit(fake_spec()).id)
    assert job.state == common_pb2.FAILED
    assert job.error.startswith("explain: layer: the fake explainer refuses this layer")


def test_restart_resumes_and_redoes_nothing(world: FakeWorld) -> None:
    world.behaviour.block_delay_s = 0.15
    world.start_gateway()
    with world.client() as client:
        job = client.submit(fake_spec())
    wait_until(lambda: len(world.behaviour.computed) >= 3, what="some blocks")
    world.stop_gateway()
    assert world.store.get_json(keys.job(job.id))["state"] == "EXPLAINING"
    before = list(world.behaviour.computed)

    world.behaviour.block_delay_s = 0.0
    world.start_gateway()
    with world.client() as client:
        resumed = client.wait(job.id)
        assert resumed.state == common_pb2.SUCCEEDED, resumed.error
        computed = world.behaviour.computed
        assert len(computed) == len(set(computed)), "a finished block was computed again"
        assert computed[: len(before)] == before
        again = client.wait(client.submit(fake_spec(name="uninterrupted")).id)
        for layer in ("conv1", "conv2"):
            assert client.results(job.id, layer) == client.results(again.id, layer)


def test_a_token_is_required_when_configured(world: FakeWorld) -> None:
    world.start_gateway(auth_token="s3cret")
    with world.client() as anonymous:
        for call in (lambda: anonymous.jobs(), lambda: anonymous.submit(fake_spec())):
            with pytest.raises(grpc.RpcError) as denied:
                call()
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with world.client(auth_token="wrong") as wrong, pytest.raises(grpc.RpcError) as denied:
        wrong.jobs()
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with world.client(auth_token="s3cret") as client:
        assert client.jobs() == []


@pytest.mark.parametrize("case", HOSTILE, ids=[h.name for h in HOSTILE])
def test_hostile_specs_are_refused_and_nothing_is_stored(world: FakeWorld, case) -> None:
    world.start_gateway()
    before = world.store.list("")
    spec = fake_spec()
    case.spoil(spec)
    with world.client() as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.submit(spec)
        assert refused.value.code() == case.code, refused.value.details()
        assert refused.value.details().startswith(f"{case.field}:"), refused.value.details()
        assert client.jobs() == []  # still serving
    assert world.store.list("") == before


def test_list_units_refuses_bad_ranges(world: FakeWorld) -> None:
    world.start_gateway()
    with world.client() as client:
        job = client.wait(client.submit(fake_spec()).id)
        for kwargs, field in (({"unit_start": -1}, "unit_start"),
                              ({"unit_start": 5, "unit_end": 2}, "unit_end"),
                              ({"min_iou": 3.0}, "min_iou")):
            with pytest.raises(grpc.RpcError) as refused:
                list(client.units(job.id, "conv1", **kwargs))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details().startswith(field)
        assert list(client.units(job.id, "conv1", unit_start=10**9)) == []
        with pytest.raises(grpc.RpcError) as unknown:
            client.get("0123456789abcdef")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert job.state in TERMINAL


def test_a_watch_survives_a_gateway_restart(world: FakeWorld) -> None:
    world.behaviour.block_delay_s = 0.1
    world.start_gateway()
    states: list[int] = []
    with world.client() as client:
        job = client.submit(fake_spec())
        follower = threading.Thread(
            target=lambda: states.extend(j.state for j in client.watch(job.id)))
        follower.start()
        wait_until(lambda: len(world.behaviour.computed) >= 2, what="some blocks")
        world.stop_gateway()
        world.behaviour.block_delay_s = 0.0
        world.start_gateway()
        follower.join(timeout=30)
    assert not follower.is_alive()
    assert states[-1] == common_pb2.SUCCEEDED
