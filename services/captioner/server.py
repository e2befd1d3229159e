"""The captioner process: `build(settings).start().wait()` (`neurodissect serve captioner`)."""

from __future__ import annotations

import grpc
from neurodissect.v1 import captioner_pb2, captioner_pb2_grpc

from services.captioner.servicer import CaptionerServicer
from services.common.server import ServiceServer
from services.common.settings import Settings


def build(settings: Settings) -> ServiceServer:
    """The captioner server for `settings`, not yet started."""
    servicer = CaptionerServicer(settings)

    def register(server: grpc.Server) -> list[str]:
        captioner_pb2_grpc.add_CaptionerServicer_to_server(servicer, server)
        return [captioner_pb2.DESCRIPTOR.services_by_name["Captioner"].full_name]

    return ServiceServer("captioner", settings, register)
