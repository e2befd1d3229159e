"""Resubmitting the spec of a FAILED job with its idempotency key retries that job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import json_format
from neurodissect.v1 import common_pb2

from services.cli import main as cli
from services.common import keys
from tests.integration.gateway_fakes import FakeWorld, fake_spec


def test_a_failed_job_is_retried_resuming_its_stored_work(world: FakeWorld) -> None:
    world.behaviour.fail_explain = "conv2"
    world.start_gateway()
    spec = fake_spec(idempotency_key="nightly-7")
    with world.client() as client:
        failed = client.wait(client.submit(spec).id)
        assert failed.state == common_pb2.FAILED and failed.attempt == 1
        done_before = list(world.behaviour.computed)
        assert {layer for layer, _, _ in done_before} == {"conv1"}

        world.behaviour.fail_explain = ""
        retried = client.submit(spec)
        assert retried.id == failed.id
        assert retried.state == common_pb2.QUEUED and retried.attempt == 2
        assert retried.previous_error == failed.error and not retried.error
        finished = client.wait(retried.id)
        assert finished.state == common_pb2.SUCCEEDED, finished.error
        assert client.submit(spec).attempt == 2  # a SUCCEEDED job is returned, not rerun
    computed = world.behaviour.computed
    assert computed[: len(done_before)] == done_before
    assert len(computed) == len(set(computed)), "a stored block was computed again"
    redone = [c for c in computed[len(done_before):] if c[0] == "conv1" and c[1] != "simulation"]
    assert not redone, "conv1 was explained again"
    stored = world.store.get_json(keys.job(failed.id))
    assert stored["attempt"] == 2 and stored["state"] == "SUCCEEDED"


def test_the_cli_says_it_retries(
    world: FakeWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world.behaviour.fail_explain = "conv1"
    world.start_gateway()
    spec = fake_spec(idempotency_key="cli-retry")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(json_format.MessageToDict(spec)))
    argv = ["--gateway-addr", world.settings.gateway_addr, "submit", str(path), "--wait"]
    assert cli.main(argv) == cli.EXIT_JOB_FAILED
    capsys.readouterr()
    world.behaviour.fail_explain = ""
    assert cli.main(argv) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "attempt 2: the job FAILED before (explain: layer: the fake explainer" in out
    assert "retrying it, resuming the work it stored" in out
