"""Fixtures for gateway tests against stand-in peers (see gateway_fakes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.gateway_fakes import FakeWorld


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[FakeWorld]:
    fake = FakeWorld(tmp_path)
    for name in ("extractor", "explainer", "captioner"):
        fake.start_peer(name)
    try:
        yield fake
    finally:
        fake.behaviour.gate.set()
        fake.close()
