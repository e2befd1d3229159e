"""The captioner process: `build(settings).start().wait()` (`neurodissect serve captioner`)."""

from __future__ import annotations

import grpc
from neurodissect.v1 import captioner_pb2, captioner_pb2_grpc

from services.common.lazy_servicer import lazy_servicer
from services.common.server import ServiceServer
from services.common.settings import Settings

SERVICE = captioner_pb2.DESCRIPTOR.services_by_name["Captioner"]


def build(settings: Settings) -> ServiceServer:
    """The captioner server for `settings`, not yet started.

    Its servicer (torch, torchvision) loads on the first call, each call loads the
    checkpoint it names, and the servicer is dropped when the captioner has been
    idle a while.
    """

    def servicer() -> captioner_pb2_grpc.CaptionerServicer:
        from services.captioner.servicer import CaptionerServicer

        return CaptionerServicer(settings)

    def register(server: grpc.Server) -> list[str]:
        captioner_pb2_grpc.add_CaptionerServicer_to_server(
            lazy_servicer(captioner_pb2_grpc.CaptionerServicer, SERVICE, servicer), server
        )
        return [SERVICE.full_name]

    return ServiceServer("captioner", settings, register)
