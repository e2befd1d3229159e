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
from services.common.spec_vocabulary import OCCLUSION_METHOD
from services.gateway.stage_context import StageClock, StageContext

NAME = "occlusion"


def occlude(
    ctx: StageContext, layers: list[str], clock: StageClock, units_total: int
) -> tuple[dict[str, str], int]:
    """Have the extractor store the layers' activation changes: (layer -> key, regions).

    The stage's progress counts the regions first, then the units verified after them
    (`units_total`), so it only ever moves forward.
    """
    spec = ctx.job.spec
    request = extractor_pb2.OccludeRequest(
        job_id=ctx.job.id, model=spec.model, layers=layers, dataset=spec.dataset,
        compute=spec.compute, params=spec.occlusion,
    )

    regions = 0  # as the extractor counts them; none streamed when its result was stored

    def attempt() -> extractor_pb2.OccludeProgress:
        nonlocal regions
        final = None
        # Read to the end, as the extract stage does: the call then ends OK on both sides.
        for message in ctx.stream(ctx.peers.extractor, "Occlude", request):
            if message.finished:
                final = message
                continue
            regions = int(message.regions_total)
            ctx.save(clock.progress(message.regions_done, regions + units_total,
                                    f"occluding regions: {message.message}"))
        if final is None:
            raise Unavailable("extractor: Occlude stream ended without a finished message")
        return final

    final = ctx.retrying("extractor", attempt)
    missing = [layer for layer in layers if layer not in final.occlusion_keys]
    if missing:
        raise FailedPrecondition(f"extractor stored no occlusion changes for {missing}")
    return dict(final.occlusion_keys), regions


def run(ctx: StageContext) -> None:
    """Occlude and verify every layer not verified yet, streaming region and unit progress."""
    job, spec = ctx.job, ctx.job.spec
    if not spec.HasField(OCCLUSION_METHOD):
        return
    ctx.enter(common_pb2.EXPLAINING)
    n_units = {layer: ctx.n_units(layer) for layer in spec.layers}
    todo = ctx.layers_missing(OCCLUSION_METHOD)
    if not todo:
        return
    clock = StageClock(NAME, "regions, units")
    units_total = sum(n_units[layer] for layer in todo)
    occlusion_keys, regions = occlude(ctx, todo, clock, units_total)
    total = regions + units_total
    done = dict.fromkeys(todo, 0)
    for layer in todo:
        request = explainer_pb2.ExplainRequest(
            job_id=job.id, layer=layer, methods=[OCCLUSION_METHOD], spec=spec,
            dataset_key=job.dataset_key, acts_key=job.acts_keys[layer],
            occlusion_key=occlusion_keys[layer],
        )

        def on_progress(message: explainer_pb2.ExplainProgress, layer: str = layer) -> None:
            done[layer] = min(message.units_done, n_units[layer])
            ctx.save(clock.progress(regions + sum(done.values()), total,
                                    f"{layer}: {OCCLUSION_METHOD} {message.message}".strip()))

        ctx.explain_layer(request, on_progress)
        done[layer] = n_units[layer]
