"""The gateway's connections to the extractor, explainer and captioner.

Channels are opened once (TLS and token from the settings). Unary calls go
through `services.common.client.Peer` (deadline, UNAVAILABLE retried); a failed
call's status is turned back into the project's error of the same code, so the
gateway's own callers see the peer's code and message unchanged.
"""

from __future__ import annotations

import grpc
from neurodissect.v1 import (
    captioner_pb2_grpc,
    common_pb2,
    explainer_pb2_grpc,
    extractor_pb2,
    extractor_pb2_grpc,
)

from services.common import errors
from services.common.client import Peer, open_channel
from services.common.settings import Settings

# DescribeModel loads a model (a large one from a local file can take minutes):
# allow it, and the submission that waits for it, more time than an ordinary call.
DESCRIBE_TIMEOUT_S = 900.0

_ERRORS: dict[grpc.StatusCode, type[errors.NeurodissectError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
}


def peer_error(exc: grpc.RpcError, peer: str) -> errors.NeurodissectError:
    """The project error for a failed peer call, keeping its code and message."""
    code = exc.code()
    details = exc.details() or code.name
    kind = _ERRORS.get(code)
    if kind is None:
        return errors.NeurodissectError(f"{peer}: {code.name}: {details}")
    return kind(details)


class Peers:
    """Stubs of the three backend services; one per extractor replica.

    `extractor` is the first replica: it serves every extractor call but the shards of
    a sharded extraction (`extractors`).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._channels = {
            name: open_channel(settings.address_of(name), settings)
            for name in ("explainer", "captioner")
        }
        for k, address in enumerate(settings.extractor_addresses()):
            self._channels[f"extractor-{k}"] = open_channel(address, settings)
        self.extractors = [
            Peer(extractor_pb2_grpc.ExtractorStub(channel), settings)
            for name, channel in self._channels.items() if name.startswith("extractor-")
        ]
        self.extractor = self.extractors[0]
        self.explainer = Peer(
            explainer_pb2_grpc.ExplainerStub(self._channels["explainer"]), settings
        )
        self.captioner = Peer(
            captioner_pb2_grpc.CaptionerStub(self._channels["captioner"]), settings
        )

    def describe_model(self, model: common_pb2.ModelSpec) -> common_pb2.DescribeModelResponse:
        """The extractor's description of `model`: its layers and their output shapes."""
        try:
            response: common_pb2.DescribeModelResponse = self.extractor.unary(
                "DescribeModel",
                common_pb2.DescribeModelRequest(model=model),
                timeout=DESCRIBE_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            raise peer_error(exc, "extractor") from None
        return response

    def embed_text(self, request: extractor_pb2.EmbedTextRequest) -> str:
        """Ask the extractor to embed texts with a CLIP model; return the stored key."""
        try:
            response: extractor_pb2.EmbedTextResponse = self.extractor.unary(
                "EmbedText", request, timeout=DESCRIBE_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            raise peer_error(exc, "extractor") from None
        return response.key

    def materialize(self, request: extractor_pb2.MaterializeRequest) -> list[str]:
        """Ask the extractor to store thumbnails of probe images; return their keys."""
        try:
            response: extractor_pb2.MaterializeResponse = self.extractor.unary(
                "Materialize", request, timeout=DESCRIBE_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            raise peer_error(exc, "extractor") from None
        return list(response.keys)

    def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            channel.close()
