"""Fixtures for gateway tests against stand-in peers (see gateway_fakes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.server import ServiceServer
from services.common.settings import Settings
from services.common.store import LocalStore
from services.gateway.client import NeurodissectClient
from services.gateway.server import GatewayServer, build
from tests.fixtures.ports import free_port
from tests.integration.gateway_fakes import Behaviour, start_fake


class FakeWorld:
    """A real gateway (in this process) wired to fake extractor, explainer and captioner."""

    def __init__(self, root: Path) -> None:
        self.store = LocalStore(root / "store")
        self.behaviour = Behaviour()
        ports = {name: free_port() for name in ("gateway", "extractor", "explainer", "captioner")}
        self.settings = Settings(
            store_url=self.store.url,
            metrics_port=0,
            rpc_timeout_s=10.0,
            **{f"{name}_addr": f"127.0.0.1:{port}" for name, port in ports.items()},
        )
        self.ports = ports
        self.peers: dict[str, ServiceServer] = {}
        self.gateway: GatewayServer | None = None

    def start_peer(self, name: str) -> None:
        self.peers[name] = start_fake(name, self.settings, self.store, self.behaviour,
                                      self.ports[name])

    def stop_peer(self, name: str) -> None:
        self.peers.pop(name).stop(grace=0.1)

    def start_gateway(self, **changes: object) -> GatewayServer:
        settings = self.settings.replace(port=self.ports["gateway"], **changes)
        self.gateway = build(settings).start()
        return self.gateway

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.stop(grace=0.1)
            self.gateway = None

    def client(self, **changes: object) -> NeurodissectClient:
        return NeurodissectClient(self.settings.replace(**changes))

    def close(self) -> None:
        self.stop_gateway()
        for name in list(self.peers):
            self.stop_peer(name)


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
