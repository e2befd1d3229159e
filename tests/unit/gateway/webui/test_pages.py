"""The unit page's answers table: every method's answer, its simulation ρ and ablation α."""

from __future__ import annotations

import math

from neurodissect.v1 import common_pb2

from services.gateway.webui import pages


def test_answers_show_occlusion_and_ablation_beside_each_method() -> None:
    unit = common_pb2.UnitResult(layer="layer3", unit=4)
    unit.netdissect.label, unit.netdissect.iou, unit.netdissect.detector = "red", 0.31, True
    unit.linear.explanation, unit.linear.val_corr = "0.5·red", 0.8
    unit.simulation.update({"netdissect": 0.62, "linear": 0.9})
    unit.ablation.update({"netdissect": 0.25})
    unit.occlusion.top_concept, unit.occlusion.top_drop = "red", 0.87
    unit.occlusion.matches_netdissect, unit.occlusion.own_drop = True, 0.87
    unit.occlusion.drops.add(concept="red", score=0.87)
    cells = {title: rest for title, *rest in pages._answer_cells(unit)}
    assert list(cells) == ["NetDissect", "linear", "occlusion"]
    assert cells["NetDissect"][2:] == ["0.620", "0.250"]
    assert cells["linear"][2:] == ["0.900", ""]  # no α: the column stays empty
    answer, score, *_ = cells["occlusion"]
    assert "hiding red drops it most" in answer and "= its NetDissect label" in answer
    assert score == "−δ 0.870"


def test_an_unoccluded_label_has_no_own_drop() -> None:
    unit = common_pb2.UnitResult(layer="layer3", unit=1)
    unit.occlusion.top_concept, unit.occlusion.top_drop = "blue", 0.4
    unit.occlusion.own_drop = math.nan
    (title, answer, *_), = pages._answer_cells(unit)
    assert title == "occlusion" and "label's" not in answer
