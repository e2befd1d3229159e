"""The gateway process: `build(settings).start().wait()`.

On start it resumes every job that is not terminal, from what the object store
holds; on stop it leaves running jobs as stored, to be resumed by the next start.
"""

from __future__ import annotations

import grpc
from neurodissect.v1 import gateway_pb2, gateway_pb2_grpc

from services.common.server import ServiceServer
from services.common.settings import Settings
from services.gateway.jobs import JobStore
from services.gateway.orchestrator import Orchestrator
from services.gateway.peers import Peers
from services.gateway.servicer import GatewayServicer


class GatewayServer(ServiceServer):
    """The gateway's ServiceServer, which also owns the orchestrator and peer channels."""

    def __init__(self, settings: Settings) -> None:
        store = settings.open_store()
        self.jobs = JobStore(store)
        self.peers = Peers(settings)
        self.orchestrator = Orchestrator(settings, store, self.jobs, self.peers)
        servicer = GatewayServicer(settings, store, self.jobs, self.orchestrator, self.peers)

        def register(server: grpc.Server) -> list[str]:
            gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
            return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

        super().__init__("gateway", settings, register, max_workers=64)

    def start(self) -> GatewayServer:
        """Start serving, then resume the stored jobs that are not terminal."""
        super().start()
        self.orchestrator.resume()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop the running jobs (their state stays stored), then the server."""
        self.orchestrator.close()
        super().stop(grace)
        self.peers.close()


def build(settings: Settings) -> GatewayServer:
    """The gateway server for `settings`, not yet started."""
    return GatewayServer(settings)
