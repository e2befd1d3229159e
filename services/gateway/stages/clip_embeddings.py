"""The CLIP models a spec's methods need, and the stored embeddings the stages hand on."""

from __future__ import annotations

from neurodissect.v1 import common_pb2, extractor_pb2

from services.common.errors import FailedPrecondition
from services.gateway.stage_context import StageContext


def clip_id(clip: common_pb2.ClipModelSpec) -> str:
    """The extractor's name for a CLIP model in `image_embedding_keys`: 'arch|weights_uri'."""
    return f"{clip.arch}|{clip.weights_uri}"


def linear_clip(spec: common_pb2.DissectionSpec) -> common_pb2.ClipModelSpec:
    """The CLIP model of LE(CLIP): `linear.clip`, else CLIP-Dissect's."""
    return spec.linear.clip if spec.linear.HasField("clip") else spec.clip_dissect.clip


def clip_models(spec: common_pb2.DissectionSpec) -> list[common_pb2.ClipModelSpec]:
    """Every CLIP model whose image embeddings the spec's methods need, without repeats."""
    models: list[common_pb2.ClipModelSpec] = []
    if spec.HasField("clip_dissect"):
        models.append(spec.clip_dissect.clip)
    if spec.HasField("linear") and spec.linear.concepts == "clip":
        models.append(linear_clip(spec))
    if spec.HasField("simulation") and spec.simulation.simulator.arch:
        models.append(spec.simulation.simulator)
    unique = {clip_id(m): m for m in models}
    return list(unique.values())


def image_key(ctx: StageContext, clip: common_pb2.ClipModelSpec) -> str:
    """The store key of the probe images' embeddings by `clip`, as extraction stored them."""
    try:
        return ctx.image_keys[clip_id(clip)]
    except KeyError:
        raise FailedPrecondition(
            f"extractor stored no image embeddings for CLIP {clip_id(clip)!r}"
        ) from None


def embed_text(ctx: StageContext, request: extractor_pb2.EmbedTextRequest) -> str:
    """Have the extractor embed texts or a concept set; the store key of the embeddings."""
    return ctx.retrying("extractor", lambda: ctx.peers.embed_text(request))
