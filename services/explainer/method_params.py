"""The parameters of each method with their defaults applied, read once from the DissectionSpec.

Block tasks receive these small frozen values, never the proto, so a default is
decided in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from neurodissect.v1 import common_pb2

from services.explainer import clip_dissect, compositional, netdissect


@dataclass(frozen=True)
class NetDissectSettings:
    """Network Dissection: threshold quantile, IoU denominator, detector IoU, exemplars."""

    top_quantile: float
    iou_mode: netdissect.IoUMode
    detector_iou: float
    exemplars: int


@dataclass(frozen=True)
class CompositionalSettings:
    """Compositional explanations: beam search and the threshold quantile it uses."""

    search: compositional.SearchSettings
    top_quantile: float


@dataclass(frozen=True)
class ClipDissectSettings:
    """CLIP-Dissect: similarity function and pooling of the unit activations."""

    similarity: str
    pooling: str


@dataclass(frozen=True)
class LinearSettings:
    """Linear explanations: concept matrix kind, optional sigmoid (a, b), split seed."""

    concepts: str  # "label" | "clip"
    a: float | None
    b: float | None
    seed: int


def netdissect_settings(spec: common_pb2.DissectionSpec) -> NetDissectSettings:
    """NetDissectParams with defaults (quantile 0.005, `lite`, IoU 0.04, 15 exemplars)."""
    p = spec.netdissect
    mode: netdissect.IoUMode = "lite"
    for allowed in netdissect.IOU_MODES:
        if p.iou_mode == allowed:
            mode = allowed
    return NetDissectSettings(
        top_quantile=(
            p.top_quantile if p.HasField("top_quantile") else netdissect.DEFAULT_TOP_QUANTILE
        ),
        iou_mode=mode,
        detector_iou=(
            p.detector_threshold
            if p.HasField("detector_threshold")
            else netdissect.DEFAULT_DETECTOR_IOU
        ),
        exemplars=p.exemplars or netdissect.DEFAULT_EXEMPLARS,
    )


def compositional_settings(spec: common_pb2.DissectionSpec) -> CompositionalSettings:
    """CompositionalParams with defaults; the quantile defaults to netdissect's."""
    p = spec.compositional
    return CompositionalSettings(
        search=compositional.SearchSettings(
            beam=p.beam or compositional.DEFAULT_BEAM,
            max_length=p.max_length or compositional.DEFAULT_MAX_LENGTH,
            top_k=p.top_k_primitives or None,
            length_penalty=(
                p.length_penalty
                if p.HasField("length_penalty")
                else compositional.DEFAULT_LENGTH_PENALTY
            ),
        ),
        top_quantile=(
            p.top_quantile
            if p.HasField("top_quantile")
            else netdissect_settings(spec).top_quantile
        ),
    )


def clip_dissect_settings(spec: common_pb2.DissectionSpec) -> ClipDissectSettings:
    """ClipDissectParams with defaults (`soft_wpmi`, spatial mean)."""
    p = spec.clip_dissect
    return ClipDissectSettings(
        similarity=p.similarity or clip_dissect.DEFAULT_METHOD, pooling=p.pooling or "mean"
    )


def linear_settings(spec: common_pb2.DissectionSpec) -> LinearSettings:
    """LinearParams with defaults (LE(Label), calibrated (a, b), split seed 0).

    `max_concepts` is checked by the plan: the fit selects at most `linear.MAX_CONCEPTS`.
    """
    p = spec.linear
    return LinearSettings(
        concepts=p.concepts or "label",
        a=p.a if p.HasField("a") else None,
        b=p.b if p.HasField("b") else None,
        seed=p.seed,
    )
