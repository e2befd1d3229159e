"""CAPTIONING: per layer, one Caption call when the spec sets `milan`."""

from __future__ import annotations

from neurodissect.v1 import captioner_pb2, common_pb2

from services.common.errors import FailedPrecondition, Unavailable
from services.common.result_store import covered
from services.common.spec_vocabulary import CAPTION_METHOD
from services.gateway.stage_context import StageClock, StageContext

NAME = "caption"


def run(ctx: StageContext) -> None:
    """Caption every layer whose unit blocks are not all stored, streaming unit progress."""
    job, spec = ctx.job, ctx.job.spec
    if not spec.HasField(CAPTION_METHOD):
        return
    ctx.enter(common_pb2.CAPTIONING)
    n_units = {layer: ctx.n_units(layer) for layer in spec.layers}
    total = sum(n_units.values())
    done = {
        layer: n
        for layer, n in n_units.items()
        if covered(ctx.store, job.id, layer, CAPTION_METHOD, n)
    }
    clock = StageClock(NAME, "units")
    ctx.save(clock.progress(sum(done.values()), total, "starting"))
    for layer in spec.layers:
        if layer in done:
            continue
        request = captioner_pb2.CaptionRequest(
            job_id=job.id,
            layer=layer,
            params=spec.milan,
            dataset=spec.dataset,
            dataset_key=job.dataset_key,
            acts_key=job.acts_keys[layer],
            compute=spec.compute,
        )

        def attempt(request: captioner_pb2.CaptionRequest = request, layer: str = layer) -> None:
            finished = False
            for message in ctx.stream(ctx.peers.captioner, "Caption", request):
                done[layer] = min(message.units_done, n_units[layer])
                ctx.save(clock.progress(
                    sum(done.values()), total, f"{layer}: {message.message}".strip()))
                finished = finished or message.finished
            if not finished:
                raise Unavailable(f"captioner: stream for layer {layer!r} ended early")

        ctx.retrying("captioner", attempt)
        if not covered(ctx.store, job.id, layer, CAPTION_METHOD, n_units[layer]):
            raise FailedPrecondition(
                f"captioner finished layer {layer!r} but did not store every unit block"
            )
        done[layer] = n_units[layer]
