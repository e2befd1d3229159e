"""A job's toy world through the gateway and a real extractor process: its generation
shows as extract progress, and cancelling the job stops it and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from neurodissect.v1 import common_pb2

from services.common.client import wait_healthy
from tests.fixtures.processes import stop
from tests.integration.gateway_fakes import FakeWorld

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[tuple[FakeWorld, Path]]:
    """The gateway with a real extractor (fake explainer and captioner)."""
    world = FakeWorld(tmp_path)
    cache = tmp_path / "cache"
    extractor = world.settings.replace(port=world.ports["extractor"], cache_dir=str(cache))
    env = {**os.environ, **extractor.environment(), "PYTHONPATH": str(REPO)}
    with (tmp_path / "extractor.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.extractor"], cwd=REPO,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(world.settings.extractor_addr, world.settings, timeout=60)
            for name in ("explainer", "captioner"):
                world.start_peer(name)
            world.start_gateway()
            yield world, cache
        finally:
            world.close()
            stop(process)


def test_generation_is_progress_of_the_job_and_stops_when_it_is_cancelled(
    stack: tuple[FakeWorld, Path],
) -> None:
    world, cache = stack
    spec = common_pb2.DissectionSpec(
        model=common_pb2.ModelSpec(source="toy", name="planted"),
        layers=["colors"],
        dataset=common_pb2.DatasetSpec(kind="toyworld", toyworld=common_pb2.ToyWorldParams(
            n_images=4000, image_size=32, seed=11)),  # about 20 s of generation
    )
    with world.client() as client:
        job_id = client.submit(spec).id
        seen = None
        for job in client.watch(job_id):
            extract = [s for s in job.stages if s.stage == "extract"]
            if extract and extract[0].message == "generating the toy world" and extract[0].done:
                seen = extract[0]
                break
        assert seen is not None and seen.total == 4000 and 0 < seen.done < 4000
        assert client.cancel(job_id).state == common_pb2.CANCELLED
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(p.is_dir() for p in (cache / "toyworld").iterdir()):
        time.sleep(0.1)
    assert [p.name for p in (cache / "toyworld").iterdir() if p.is_dir()] == []
