"""EXTRACTING: one Extract call for all layers (cached by the extractor when already done)."""

from __future__ import annotations

from neurodissect.v1 import common_pb2, extractor_pb2

from services.common.errors import FailedPrecondition, Unavailable
from services.gateway.stage_context import StageClock, StageContext
from services.gateway.stages.clip_embeddings import clip_models

NAME = "extract"


def run(ctx: StageContext) -> None:
    """Extract streams image progress; its last message names the stored data.

    Records the dataset and activation keys in the job and the CLIP image
    embedding keys in `ctx.image_keys`.
    """
    ctx.enter(common_pb2.EXTRACTING)
    job, spec = ctx.job, ctx.job.spec
    request = extractor_pb2.ExtractRequest(
        job_id=job.id,
        model=spec.model,
        layers=spec.layers,
        dataset=spec.dataset,
        compute=spec.compute,
        clip_models=clip_models(spec),
    )
    clock = StageClock(NAME, "images")

    def attempt() -> extractor_pb2.ExtractProgress:
        final = None
        # Read the stream to its end (the finished message is its last), so that the call
        # ends OK on both sides instead of being cancelled by a client that stopped reading.
        for message in ctx.stream(ctx.peers.extractor, "Extract", request):
            if message.finished:
                final = message
            else:
                ctx.save(clock.progress(
                    message.images_done, message.images_total, message.message))
        if final is None:
            raise Unavailable("extractor: stream ended without a finished message")
        return final

    final = ctx.retrying("extractor", attempt)
    job.dataset_key = final.dataset_key
    job.acts_keys.clear()
    job.acts_keys.update(final.acts_keys)
    job.bad_images = final.bad_images
    del job.bad_image_examples[:]
    job.bad_image_examples.extend(final.bad_image_examples)
    missing = [layer for layer in spec.layers if layer not in job.acts_keys]
    if missing:
        raise FailedPrecondition(f"extractor returned no activations for {missing}")
    ctx.save(clock.progress(
        final.images_total, final.images_total,
        "cached" if final.cached else final.message or "done"))
    ctx.image_keys = dict(final.image_embedding_keys)
