"""Fixtures shared by the whole suite: a running local stack of the four services.

`platform` starts gateway, extractor, explainer and captioner as real processes on
free loopback ports (once per test session) with a fresh store; the toy world and
toy models are cached in the repository's `var/cache`, shared with `make run`.
`reference_job` is one toy dissection on it by every method, run once per session
and shared by the modules that check its results.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from neurodissect.v1 import common_pb2

from services.cli.main import available_methods, demo_layers, demo_spec
from services.cli.stack import LocalStack, available_services
from services.common.settings import SERVICES, Settings
from services.gateway.client import NeurodissectClient

REPO = Path(__file__).resolve().parents[1]
TOY_IMAGES, TOY_SIZE = 200, 32
STACK_START_TIMEOUT_S = 900.0


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The four services as separate processes, healthy, sharing a fresh store."""
    root = tmp_path_factory.mktemp("platform")
    settings = Settings(
        store_url=f"file://{root / 'store'}",
        cache_dir=str(REPO / "var" / "cache"),
        rpc_timeout_s=60.0,
    )
    stack = LocalStack(settings, services=SERVICES, ray_head=False, log_dir=root / "logs")
    stack.start(timeout=STACK_START_TIMEOUT_S)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def toy_spec(platform: LocalStack) -> common_pb2.DissectionSpec:
    """A small dissection of toynet on the toy world by every installed method."""
    with NeurodissectClient(platform.settings) as client:
        described = client.describe_model(common_pb2.ModelSpec(source="toy", name="toynet"))
    methods = available_methods(available_services())
    return demo_spec(demo_layers(described), methods, TOY_IMAGES, TOY_SIZE)


@pytest.fixture(scope="session")
def reference_job(
    platform: LocalStack, toy_spec: common_pb2.DissectionSpec
) -> common_pb2.Job:
    """The toy dissection, submitted through the Python client and run without interruption."""
    with NeurodissectClient(platform.settings) as client:
        job = client.submit(toy_spec)
        return client.wait(job.id)
