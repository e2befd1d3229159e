"""The gateway process: `build(settings).start().wait()`.

On start it resumes every job that is not terminal, from what the object store
holds, and serves the web UI on `settings.ui_port` (0: not served); on stop it
leaves running jobs as stored, to be resumed by the next start.
"""

from __future__ import annotations

import logging

import grpc
from neurodissect.v1 import gateway_pb2, gateway_pb2_grpc

from services.common.server import ServiceServer
from services.common.settings import Settings
from services.gateway.job_runner import JobRunner
from services.gateway.jobs import JobStore
from services.gateway.peers import Peers
from services.gateway.servicer import GatewayServicer
from services.gateway.store_watch import StoreWatch
from services.gateway.webui.data import JobReader
from services.gateway.webui.server import WebUI

log = logging.getLogger(__name__)


class GatewayServer(ServiceServer):
    """The gateway's ServiceServer, which also owns the job runner and peer channels."""

    def __init__(self, settings: Settings) -> None:
        store = settings.open_store()
        self.jobs = JobStore(store)
        self.peers = Peers(settings)
        self.store_watch = StoreWatch(store)
        self.runner = JobRunner(settings, store, self.jobs, self.peers)
        servicer = GatewayServicer(
            settings, store, self.jobs, self.runner, self.peers, self.store_watch
        )
        self.web_ui = WebUI(settings, JobReader(store, self.peers.materialize, self.jobs))

        def register(server: grpc.Server) -> list[str]:
            gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
            return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

        super().__init__("gateway", settings, register, max_workers=64)

    def start(self) -> GatewayServer:
        """Start serving gRPC and the web UI, then resume the stored jobs that are not terminal.

        A UI port that cannot be bound is logged and the gateway serves without the UI:
        the API and the running jobs matter more than the pages.
        """
        super().start()
        self.store_watch.start()
        if self.settings.ui_port:
            try:
                self.web_ui.start()
                log.info("web UI at %s", self.web_ui.url)
            except OSError as exc:
                log.error("web UI not served: port %d: %s", self.settings.ui_port, exc)
        self.runner.resume()
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop the running jobs (their state stays stored), then the server."""
        self.runner.close()
        self.store_watch.stop()
        self.web_ui.stop()
        super().stop(grace)
        self.peers.close()


def build(settings: Settings) -> GatewayServer:
    """The gateway server for `settings`, not yet started."""
    return GatewayServer(settings)
