"""EXPLAINING, after the explainer's methods: occlusion verification (specs/verification.md).

When the spec sets `occlusion`, the extractor runs the occluded copies of the
sampled regions through the model (Occlude, one call for every layer not verified
yet, cached by content key), then Explain runs `occlusion` per layer with the key
of the stored changes; it reads NetDissect's stored labels, which the explain stage
stored before.
"""

from __future__ import annotations

from neurodissect.v1 import common_pb2, explainer_pb2, extractor_pb2

from services.common.errors import FailedPrecondition, Unavailable
from services.common.result_store import covered
from services.common.spec_vocabulary import OCCLUSION_METHOD
from services.gateway.stage_context import StageClock, StageContext

NAME = "occlusion"


def occlude(ctx: StageContext, layers: list[str]) -> dict[str, str]:
    """Have the extractor store the layers' activation changes; layer -> key."""
    spec = ctx.job.spec
    request = extractor_pb2.OccludeRequest(
        job_id=ctx.job.id, model=spec.model, layers=layers, dataset=spec.dataset,
        compute=spec.compute, params=spec.occlusion,
    )
    clock = StageClock(NAME, "regions")

    def attempt() -> extractor_pb2.OccludeProgress:
        for message in ctx.stream(ctx.peers.extractor, "Occlude", request):
            if message.finished:
                return message
            ctx.save(clock.progress(message.regions_done, message.regions_total,
                                    f"occluding regions: {message.message}"))
        raise Unavailable("extractor: Occlude stream ended without a finished message")

    final = ctx.retrying("extractor", attempt)
    missing = [layer for layer in layers if layer not in final.occlusion_keys]
    if missing:
        raise FailedPrecondition(f"extractor stored no occlusion changes for {missing}")
    return dict(final.occlusion_keys)


def run(ctx: StageContext) -> None:
    """Occlude and verify every layer not verified yet, streaming region and unit progress."""
    job, spec = ctx.job, ctx.job.spec
    if not spec.HasField(OCCLUSION_METHOD):
        return
    ctx.enter(common_pb2.EXPLAINING)
    n_units = {layer: ctx.n_units(layer) for layer in spec.layers}
    todo = [
        layer for layer in spec.layers
        if not covered(ctx.store, job.id, layer, OCCLUSION_METHOD, n_units[layer])
    ]
    if not todo:
        return
    occlusion_keys = occlude(ctx, todo)
    clock = StageClock(NAME, "units")
    total = sum(n_units[layer] for layer in todo)
    done = dict.fromkeys(todo, 0)
    for layer in todo:
        request = explainer_pb2.ExplainRequest(
            job_id=job.id, layer=layer, methods=[OCCLUSION_METHOD], spec=spec,
            dataset_key=job.dataset_key, acts_key=job.acts_keys[layer],
            occlusion_key=occlusion_keys[layer],
        )

        def on_progress(message: explainer_pb2.ExplainProgress, layer: str = layer) -> None:
            done[layer] = min(message.units_done, n_units[layer])
            ctx.save(clock.progress(sum(done.values()), total,
                                    f"{layer}: {OCCLUSION_METHOD} {message.message}".strip()))

        ctx.explain_layer(request, on_progress)
        done[layer] = n_units[layer]
