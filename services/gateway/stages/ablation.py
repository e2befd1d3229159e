"""REPORTING, after simulation: ablation scoring of every method's stored answers.

When the spec sets `ablation`, the extractor stores each layer's classifier head
(or says why a layer has none) and the probe images' classes (ClassifierHead), then
Explain runs `ablation` per layer not scored yet, with the head's key or the note,
and the simulator's embeddings simulation used (the same predictions).
"""

from __future__ import annotations

import grpc
from neurodissect.v1 import common_pb2, explainer_pb2, extractor_pb2

from services.common.spec_vocabulary import ABLATION_METHOD
from services.gateway.peers import DESCRIBE_TIMEOUT_S, peer_error
from services.gateway.stage_context import StageClock, StageContext
from services.gateway.stages.scoring import simulator_embeddings, simulator_texts

NAME = "ablation"


def classifier_heads(ctx: StageContext, layers: list[str]) -> extractor_pb2.ClassifierHeadResponse:
    """The extractor's stored heads (or notes) of `layers` and the probe images' classes."""
    spec = ctx.job.spec
    request = extractor_pb2.ClassifierHeadRequest(
        model=spec.model, layers=layers, dataset=spec.dataset, compute=spec.compute,
        labels_uri=spec.ablation.labels_uri,
    )

    def attempt() -> extractor_pb2.ClassifierHeadResponse:
        try:
            response: extractor_pb2.ClassifierHeadResponse = ctx.peers.extractor.unary(
                "ClassifierHead", request, timeout=DESCRIBE_TIMEOUT_S
            )
        except grpc.RpcError as exc:
            raise peer_error(exc, "extractor") from None
        return response

    return ctx.retrying("extractor", attempt)


def run(ctx: StageContext) -> None:
    """Score every layer not scored yet, streaming unit progress."""
    job, spec = ctx.job, ctx.job.spec
    if not spec.HasField(ABLATION_METHOD):
        return
    ctx.enter(common_pb2.REPORTING)
    n_units = {layer: ctx.n_units(layer) for layer in spec.layers}
    todo = ctx.layers_missing(ABLATION_METHOD)
    if not todo:
        return
    clock = StageClock(NAME, "units")
    total = sum(n_units[layer] for layer in todo)
    done = dict.fromkeys(todo, 0)
    ctx.save(clock.progress(0, total, "the classifier head and the classes (extractor)"))
    heads = classifier_heads(ctx, todo)
    embeddings = simulator_embeddings(ctx, simulator_texts(ctx))
    for layer in todo:
        request = explainer_pb2.ExplainRequest(
            job_id=job.id, layer=layer, methods=[ABLATION_METHOD], spec=spec,
            dataset_key=job.dataset_key, acts_key=job.acts_keys[layer], simulation=embeddings,
            ablation=explainer_pb2.AblationInputs(
                head_key=heads.head_keys.get(layer, ""), labels_key=heads.labels_key,
                note=heads.notes.get(layer, ""),
            ),
        )

        def on_progress(message: explainer_pb2.ExplainProgress, layer: str = layer) -> None:
            done[layer] = min(message.units_done, n_units[layer])
            ctx.save(clock.progress(sum(done.values()), total,
                                    f"{layer}: {ABLATION_METHOD} {message.message}".strip()))

        ctx.explain_layer(request, on_progress)
        done[layer] = n_units[layer]
