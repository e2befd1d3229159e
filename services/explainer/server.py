"""The explainer's gRPC server (`neurodissect serve explainer`)."""

from __future__ import annotations

import grpc
from neurodissect.v1 import explainer_pb2, explainer_pb2_grpc

from services.common.server import ServiceServer
from services.common.settings import Settings
from services.explainer import sharding
from services.explainer.servicer import ExplainerServicer


def build(settings: Settings) -> ServiceServer:
    """The explainer server, not started: Explain plus health, reflection, auth and metrics.

    Ray is started here (or connected to, per `settings.ray_address`): before the
    server installs its SIGTERM handler, which must replace the one Ray's core
    installs so that SIGTERM stops the server gracefully.
    """
    sharding.connect(settings)
    servicer = ExplainerServicer(settings)

    def register(server: grpc.Server) -> list[str]:
        explainer_pb2_grpc.add_ExplainerServicer_to_server(servicer, server)
        return [explainer_pb2.DESCRIPTOR.services_by_name["Explainer"].full_name]

    return ServiceServer("explainer", settings, register)
