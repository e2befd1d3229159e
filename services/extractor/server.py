"""The extractor process: `build(settings).start().wait()` (`neurodissect serve extractor`)."""

from __future__ import annotations

import logging

import grpc
from neurodissect.v1 import extractor_pb2, extractor_pb2_grpc

from services.common.lazy_servicer import lazy_servicer
from services.common.server import ServiceServer
from services.common.settings import Settings

SERVICE = extractor_pb2.DESCRIPTOR.services_by_name["Extractor"]


def build(settings: Settings) -> ServiceServer:
    """The extractor server for `settings`, not yet started.

    Its servicer (and with it torch, torchvision, timm, open_clip) loads on the first
    call, with `torch_threads` intra-op threads, and is dropped with its models when the
    extractor has been idle a while.
    """

    def servicer() -> extractor_pb2_grpc.ExtractorServicer:
        import torch

        from services.extractor.servicer import ExtractorServicer

        # Replicas sharing a machine each get their share of its cores.
        torch.set_num_threads(settings.extractor_threads())
        return ExtractorServicer(settings)

    def register(server: grpc.Server) -> list[str]:
        extractor_pb2_grpc.add_ExtractorServicer_to_server(
            lazy_servicer(extractor_pb2_grpc.ExtractorServicer, SERVICE, servicer), server
        )
        return [SERVICE.full_name]

    return ServiceServer("extractor", settings, register)


def main() -> None:
    """Serve with settings from the environment until SIGTERM or Ctrl-C."""
    settings = Settings.load()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(message)s")
    build(settings).start().wait()
