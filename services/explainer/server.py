"""The explainer's gRPC server (`neurodissect serve explainer`)."""

from __future__ import annotations

import logging
import os
import sys

import grpc
from grpc_health.v1 import health_pb2
from neurodissect.v1 import explainer_pb2, explainer_pb2_grpc

from services.common.lazy_servicer import lazy_servicer
from services.common.server import ServiceServer
from services.common.settings import Settings
from services.explainer.ray_watch import RayWatch, ray_connected, ray_endpoint

log = logging.getLogger(__name__)

SERVICE = explainer_pb2.DESCRIPTOR.services_by_name["Explainer"]
SERVICE_NAME = SERVICE.full_name
# Exit status when the Ray cluster is lost (EX_TEMPFAIL): a supervisor starts us again.
EXIT_RAY_LOST = 75


def _exit_ray_lost(reason: str) -> None:
    log.error("%s; exiting so that the explainer restarts with a fresh Ray connection", reason)
    logging.shutdown()
    sys.stderr.flush()
    # A clean shutdown would wait on Ray's driver, which hangs without its cluster.
    os._exit(EXIT_RAY_LOST)


def build(settings: Settings) -> ServiceServer:
    """The explainer server, not started: Explain plus health, reflection, auth and metrics.

    The servicer, Ray and the methods' libraries (torch, scipy) load with the first
    Explain, which starts a local Ray or connects to `settings.ray_address` then
    (`sharding.connect`); SIGTERM keeps stopping the server gracefully. Health follows the
    configured cluster (`ray_watch.RayWatch`): NOT_SERVING while it does not answer;
    the process exits (status 75) when the cluster it joined is gone for good.
    """

    def servicer() -> explainer_pb2_grpc.ExplainerServicer:
        # Ray's driver would install its C++ crash handler for SIGTERM too when it
        # connects, after the server's own handler, and SIGTERM would then kill the
        # explainer instead of stopping it gracefully (read when Ray is imported).
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        from services.explainer.servicer import ExplainerServicer

        return ExplainerServicer(settings)

    def register(server: grpc.Server) -> list[str]:
        explainer_pb2_grpc.add_ExplainerServicer_to_server(
            lazy_servicer(explainer_pb2_grpc.ExplainerServicer, SERVICE, servicer), server
        )
        return [SERVICE_NAME]

    server = ServiceServer("explainer", settings, register)

    def on_status(reachable: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if reachable
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            server.health.set(name, status)

    def on_lost(reason: str) -> None:
        # Stopping shuts down the local Ray this process started (at exit): not a loss.
        if not server.stopping.is_set():
            _exit_ray_lost(reason)

    RayWatch(
        endpoint=lambda: ray_endpoint(settings),
        connected=ray_connected,
        on_status=on_status,
        on_lost=on_lost,
    ).start()
    return server
