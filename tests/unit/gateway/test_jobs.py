"""The job state machine and its persistence."""

from __future__ import annotations

from pathlib import Path

import pytest
from neurodissect.v1 import common_pb2
from prometheus_client import REGISTRY

from services.common import keys
from services.common.errors import FailedPrecondition, NotFound
from services.common.store import LocalStore
from services.gateway.jobs import JobStore, legal_transition

Q, X, E, C, R = (common_pb2.QUEUED, common_pb2.EXTRACTING, common_pb2.EXPLAINING,
                 common_pb2.CAPTIONING, common_pb2.REPORTING)
OK, FAIL, CANCEL = common_pb2.SUCCEEDED, common_pb2.FAILED, common_pb2.CANCELLED


@pytest.mark.parametrize(("current", "new"), [
    (Q, X), (X, E), (E, C), (C, R), (R, OK), (E, R), (Q, CANCEL), (E, FAIL), (R, CANCEL),
])
def test_legal_transitions(current: int, new: int) -> None:
    assert legal_transition(current, new)


@pytest.mark.parametrize(("current", "new"), [
    (E, X), (R, E), (X, Q), (OK, FAIL), (FAIL, Q), (CANCEL, X), (OK, CANCEL), (X, X),
])
def test_illegal_transitions(current: int, new: int) -> None:
    assert not legal_transition(current, new)


def spec() -> common_pb2.DissectionSpec:
    return common_pb2.DissectionSpec(layers=["conv1"], idempotency_key="k1")


def test_jobs_round_trip_through_the_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    jobs = JobStore(store)
    job = jobs.create(spec())
    assert store.get_json(keys.job(job.id))["state"] == "QUEUED"
    jobs.transition(job, X)
    jobs.update_stage(job, common_pb2.StageProgress(stage="extract", done=3, total=10))
    jobs.update_stage(job, common_pb2.StageProgress(stage="extract", done=7, total=10))

    reopened = JobStore(store)
    loaded = reopened.get(job.id)
    assert loaded.state == X
    assert [(s.stage, s.done) for s in loaded.stages] == [("extract", 7)]
    assert loaded.spec == spec()
    assert reopened.find_by_idempotency_key("k1").id == job.id
    assert reopened.find_by_idempotency_key("other") is None


def test_a_stale_copy_never_overwrites_a_newer_state(tmp_path: Path) -> None:
    jobs = JobStore(LocalStore(tmp_path))
    job = jobs.create(spec())
    runner_copy = jobs.get(job.id)
    jobs.transition(job, CANCEL, error="cancelled by the user")
    with pytest.raises(FailedPrecondition):
        jobs.update_stage(runner_copy, common_pb2.StageProgress(stage="extract", done=1))
    with pytest.raises(FailedPrecondition):
        jobs.transition(runner_copy, X)
    assert jobs.get(job.id).state == CANCEL
    assert jobs.get(job.id).error == "cancelled by the user"


def test_listing_filters_and_orders_newest_first(tmp_path: Path) -> None:
    jobs = JobStore(LocalStore(tmp_path))
    first, second, third = (jobs.create(common_pb2.DissectionSpec(name=str(i))) for i in range(3))
    jobs.transition(second, FAIL, error="boom")
    assert [j.id for j in jobs.list()] == [third.id, second.id, first.id]
    assert [j.id for j in jobs.list(states=[Q])] == [third.id, first.id]
    assert [j.id for j in jobs.list(limit=1)] == [third.id]
    assert REGISTRY.get_sample_value("neurodissect_jobs", {"state": "FAILED"}) == 1


def test_unknown_and_malformed_ids_are_not_found(tmp_path: Path) -> None:
    jobs = JobStore(LocalStore(tmp_path))
    for job_id in ("0123456789abcdef", "../../etc/passwd", ""):
        with pytest.raises(NotFound):
            jobs.get(job_id)


def test_wait_for_change_wakes_on_a_write(tmp_path: Path) -> None:
    jobs = JobStore(LocalStore(tmp_path))
    job = jobs.create(spec())
    seen = jobs.version(job.id)
    assert jobs.wait_for_change(job.id, seen, timeout=0.05) == seen
    jobs.transition(job, X)
    assert jobs.wait_for_change(job.id, seen, timeout=0.05) == seen + 1


def test_only_a_failed_job_is_retried_as_its_next_attempt(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    jobs = JobStore(store)
    job = jobs.create(spec())
    assert job.attempt == 1
    with pytest.raises(FailedPrecondition, match=r"QUEUED; only a FAILED job is retried"):
        jobs.retry(job.id)
    jobs.transition(job, FAIL, error="extract: boom")
    retried = jobs.retry(job.id)
    assert (retried.id, retried.state, retried.attempt) == (job.id, Q, 2)
    assert retried.previous_error == "extract: boom" and not retried.error
    assert JobStore(store).get(job.id) == retried  # persisted
    jobs.transition(retried, CANCEL)
    with pytest.raises(FailedPrecondition, match=r"CANCELLED"):
        jobs.retry(job.id)
