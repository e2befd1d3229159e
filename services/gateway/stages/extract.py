"""EXTRACTING: one Extract call for all layers, or sharded over several extractor replicas.

With one extractor address this is one Extract call (cached by the extractor when already
done). With N > 1 (`extractor_addrs`): an index-only call on the first replica builds the
dataset's concept table and label chunks (which fix the probe indices), then N shard calls
run at once, replica k forwarding the image ranges whose number is k mod N, and last an
ordinary call on the first replica finds every range stored and only finishes (pooled
arrays, manifests, CLIP embeddings). Every call is retried like any stage call, under its
own progress watchdog; a failed job resumes from the stored chunks. A shard that fails for
good is reported after the others ended: their chunks are stored for the resumed job.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from neurodissect.v1 import common_pb2, extractor_pb2

from services.common.client import Peer
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
    replicas = ctx.peers.extractors
    if len(replicas) > 1:
        # Each phase has its own clock: the rate and ETA are those of the phase's work.
        index = _part(request, index_only=True)
        indexed = _call(ctx, replicas[0], "extractor", index, StageClock(NAME, "images"))
        # On a cached job every shard answers at once, without loading the model.
        _shards(ctx, request, StageClock(NAME, "images"), indexed.images_total)
    clock = StageClock(NAME, "images")
    final = _call(ctx, replicas[0], "extractor", request, clock)
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


def _call(
    ctx: StageContext,
    peer: Peer,
    name: str,
    request: extractor_pb2.ExtractRequest,
    clock: StageClock,
) -> extractor_pb2.ExtractProgress:
    """One Extract call, retried, saving its progress; its finished message."""

    def attempt() -> extractor_pb2.ExtractProgress:
        final = None
        # Read the stream to its end (the finished message is its last), so that the call
        # ends OK on both sides instead of being cancelled by a client that stopped reading.
        for message in ctx.stream(peer, "Extract", request):
            if message.finished:
                final = message
            else:
                ctx.save(clock.progress(
                    message.images_done, message.images_total, message.message))
        if final is None:
            raise Unavailable(f"{name}: stream ended without a finished message")
        return final

    return ctx.retrying(name, attempt)


def _part(request: extractor_pb2.ExtractRequest, **fields: object) -> extractor_pb2.ExtractRequest:
    """A copy of `request` with some fields set."""
    part = extractor_pb2.ExtractRequest()
    part.CopyFrom(request)
    for name, value in fields.items():
        setattr(part, name, value)
    return part


def _shards(
    ctx: StageContext, request: extractor_pb2.ExtractRequest, clock: StageClock, total: int
) -> None:
    """Run one shard call per replica at once; progress is the sum of their images done."""
    replicas = ctx.peers.extractors
    done = [0] * len(replicas)
    lock = threading.Lock()

    def shard(k: int) -> None:
        part = _part(request, shard_index=k, shard_count=len(replicas))
        name = f"extractor {k}"
        watchdog = ctx.watchdog()

        def attempt() -> None:
            finished = False
            for message in ctx.stream(replicas[k], "Extract", part, watchdog):
                if message.finished:
                    finished = True  # its counts are the whole dataset's, not the shard's
                    continue
                with lock:
                    done[k] = message.images_done
                    ctx.save(clock.progress(
                        sum(done), total, f"extracting on {len(done)} extractors"))
            if not finished:
                raise Unavailable(f"{name}: stream ended without a finished message")

        ctx.retrying(name, attempt, watchdog)

    with ThreadPoolExecutor(len(replicas), thread_name_prefix="extract-shard") as pool:
        futures = [pool.submit(shard, k) for k in range(len(replicas))]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
