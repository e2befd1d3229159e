"""REPORTING, first step: score every method's stored answers by simulation, per layer.

When the spec sets `simulation`, every label and caption the methods produced is
embedded with the simulator CLIP (when one is configured), then Explain runs
`simulation` on each layer that is not scored yet.
"""

from __future__ import annotations

from neurodissect.v1 import common_pb2, explainer_pb2, extractor_pb2

from services.common.spec_vocabulary import SCORING_METHOD
from services.gateway import results
from services.gateway.stage_context import StageClock, StageContext
from services.gateway.stages.clip_embeddings import embed_text, image_key

NAME = "report"


def simulator_embeddings(ctx: StageContext, texts: list[str]) -> explainer_pb2.ConceptEmbeddings:
    """The simulator CLIP's embeddings of `texts` and of the probe images (empty without one)."""
    simulator = ctx.job.spec.simulation.simulator
    embeddings = explainer_pb2.ConceptEmbeddings()
    if simulator.arch and texts:
        embeddings.image_key = image_key(ctx, simulator)
        embeddings.text_key = embed_text(
            ctx, extractor_pb2.EmbedTextRequest(clip=simulator, texts=texts))
    return embeddings


def simulator_texts(ctx: StageContext) -> list[str]:
    """Every label and caption the methods stored, to embed with the simulator's CLIP.

    Empty when no simulator CLIP is configured (the simulator is the label matrix).
    """
    job, spec = ctx.job, ctx.job.spec
    if not spec.simulation.simulator.arch:
        return []
    return sorted({
        text
        for layer in spec.layers
        for unit in results.unit_results(ctx.store, job.id, layer)
        for text in results.unit_labels(unit)
    })


def run(ctx: StageContext) -> None:
    """Enter REPORTING and simulate every layer not scored yet, streaming unit progress."""
    ctx.enter(common_pb2.REPORTING)
    job, spec = ctx.job, ctx.job.spec
    if not spec.HasField(SCORING_METHOD):
        return
    clock = StageClock(NAME, "units")
    n_units = {layer: ctx.n_units(layer) for layer in spec.layers}
    todo = ctx.layers_missing(SCORING_METHOD)
    total = sum(n_units.values())
    done = {layer: n for layer, n in n_units.items() if layer not in todo}
    ctx.save(clock.progress(sum(done.values()), total, SCORING_METHOD))
    if not todo:
        return
    texts = simulator_texts(ctx)
    if texts:
        message = f"embedding {len(texts)} labels and captions with the simulator's CLIP"
        ctx.save(clock.progress(sum(done.values()), total, message))
    embeddings = simulator_embeddings(ctx, texts)
    for layer in todo:
        request = explainer_pb2.ExplainRequest(
            job_id=job.id,
            layer=layer,
            methods=[SCORING_METHOD],
            spec=spec,
            dataset_key=job.dataset_key,
            acts_key=job.acts_keys[layer],
            simulation=embeddings,
        )

        def on_progress(message: explainer_pb2.ExplainProgress, layer: str = layer) -> None:
            done[layer] = min(message.units_done, n_units[layer])
            ctx.save(clock.progress(
                sum(done.values()), total,
                f"{layer}: {SCORING_METHOD} {message.message}".strip()))

        ctx.explain_layer(request, on_progress)
        done[layer] = n_units[layer]
