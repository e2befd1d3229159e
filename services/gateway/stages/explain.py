"""EXPLAINING: per layer, one Explain call with the requested methods the explainer runs.

The explainer splits the layer's units into Ray tasks of `compute.unit_block_size`
units and stores one result object per block; (layer, method) pairs whose blocks
are all stored are not asked again. CLIP-Dissect and LE(CLIP) get their text
embeddings from the extractor's EmbedText first.
"""

from __future__ import annotations

from neurodissect.v1 import common_pb2, explainer_pb2, extractor_pb2

from services.common.result_store import covered
from services.common.spec_vocabulary import EXPLAIN_METHODS
from services.gateway.stage_context import StageClock, StageContext
from services.gateway.stages.clip_embeddings import embed_text, image_key, linear_clip
from services.gateway.validation import requested_methods

NAME = "explain"


def method_embeddings(ctx: StageContext) -> dict[str, explainer_pb2.ConceptEmbeddings]:
    """ConceptEmbeddings for CLIP-Dissect and LE(CLIP), as ExplainRequest fields."""
    spec = ctx.job.spec
    out: dict[str, explainer_pb2.ConceptEmbeddings] = {}
    concept_set = spec.clip_dissect.concept_set_uri if spec.HasField("clip_dissect") else ""
    wanted = []
    if spec.HasField("clip_dissect"):
        wanted.append(("clip_dissect", spec.clip_dissect.clip))
    if spec.HasField("linear") and spec.linear.concepts == "clip":
        wanted.append(("linear", linear_clip(spec)))
    for method, clip in wanted:
        text_key = embed_text(ctx, extractor_pb2.EmbedTextRequest(
            clip=clip, concept_set_uri=concept_set, dataset_key=ctx.job.dataset_key))
        out[method] = explainer_pb2.ConceptEmbeddings(
            image_key=image_key(ctx, clip), text_key=text_key
        )
    return out


def run(ctx: StageContext) -> None:
    """Explain every layer with the methods not stored yet, streaming unit progress."""
    job, spec = ctx.job, ctx.job.spec
    methods = [m for m in requested_methods(spec) if m in EXPLAIN_METHODS]
    if not methods:
        return
    ctx.enter(common_pb2.EXPLAINING)
    n_units = {layer: ctx.n_units(layer) for layer in spec.layers}
    total = sum(n_units.values()) * len(methods)
    done: dict[tuple[str, str], int] = {}
    todo: dict[str, list[str]] = {}
    for layer in spec.layers:
        for method in methods:
            if covered(ctx.store, job.id, layer, method, n_units[layer]):
                done[(layer, method)] = n_units[layer]
            else:
                todo.setdefault(layer, []).append(method)
    clock = StageClock(NAME, "units")
    ctx.save(clock.progress(sum(done.values()), total, "starting"))
    if not todo:
        return
    if spec.HasField("clip_dissect") or spec.linear.concepts == "clip":
        ctx.save(clock.progress(
            sum(done.values()), total, "embedding the concepts with CLIP (extractor)"))
    embeddings = method_embeddings(ctx)
    for layer, layer_methods in todo.items():
        request = explainer_pb2.ExplainRequest(
            job_id=job.id,
            layer=layer,
            methods=layer_methods,
            spec=spec,
            dataset_key=job.dataset_key,
            acts_key=job.acts_keys[layer],
            **{m: embeddings[m] for m in layer_methods if m in embeddings},
        )

        def on_progress(message: explainer_pb2.ExplainProgress, layer: str = layer) -> None:
            if message.method:
                done[(layer, message.method)] = min(message.units_done, n_units[layer])
            text = f"{layer}: {message.method} {message.message}".strip()
            ctx.save(clock.progress(sum(done.values()), total, text))

        ctx.explain_layer(request, on_progress)
        for method in layer_methods:
            done[(layer, method)] = n_units[layer]
        ctx.save(clock.progress(sum(done.values()), total, f"{layer}: done"))
