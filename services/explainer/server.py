"""The explainer's gRPC server (`neurodissect serve explainer`)."""

from __future__ import annotations

import logging
import os
import sys

import grpc
from grpc_health.v1 import health_pb2
from neurodissect.v1 import explainer_pb2, explainer_pb2_grpc

from services.common.server import ServiceServer
from services.common.settings import Settings
from services.explainer import sharding
from services.explainer.servicer import ExplainerServicer

log = logging.getLogger(__name__)

SERVICE_NAME = explainer_pb2.DESCRIPTOR.services_by_name["Explainer"].full_name
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

    Ray is started here (or connected to, per `settings.ray_address`): before the
    server installs its SIGTERM handler, which must replace the one Ray's core
    installs so that SIGTERM stops the server gracefully. Health then follows the
    Ray connection (`sharding.RayWatch`): NOT_SERVING while the cluster does not
    answer; the process exits (status 75) when its cluster is gone for good.
    """
    sharding.connect(settings)
    servicer = ExplainerServicer(settings)

    def register(server: grpc.Server) -> list[str]:
        explainer_pb2_grpc.add_ExplainerServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    server = ServiceServer("explainer", settings, register)

    def on_status(reachable: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if reachable
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            server.health.set(name, status)

    sharding.RayWatch(
        endpoint=lambda: sharding.ray_endpoint(settings),
        connected=sharding.ray.is_initialized,
        on_status=on_status,
        on_lost=_exit_ray_lost,
    ).start()
    return server
