"""The explainer's methods, one module each behind `method_contract.ExplainMethod`.

`EXPLAINER_METHODS` holds them by name in running order: the threshold sweep and
significance check netdissect's stored labels, compositional reuses its thresholds,
simulation scores what the others stored; occlusion compares the extractor's
stored drops with netdissect's labels, ablation scores the stored answers after
simulation. Adding a method
adds its module here (and its field to the proto and `spec_vocabulary.METHODS`).
"""

from __future__ import annotations

from services.explainer.method_contract import ExplainMethod
from services.explainer.methods.ablation import Ablation
from services.explainer.methods.clip_dissect import ClipDissect
from services.explainer.methods.compositional import Compositional
from services.explainer.methods.linear import LinearExplanations
from services.explainer.methods.netdissect import NetDissect
from services.explainer.methods.occlusion import Occlusion
from services.explainer.methods.significance import Significance
from services.explainer.methods.simulation import Simulation
from services.explainer.methods.threshold_sweep import ThresholdSweep

EXPLAINER_METHODS: dict[str, ExplainMethod] = {
    m.name: m
    for m in (
        NetDissect(),
        ThresholdSweep(),
        Significance(),
        Compositional(),
        ClipDissect(),
        LinearExplanations(),
        Simulation(),
        Occlusion(),
        Ablation(),
    )
}
