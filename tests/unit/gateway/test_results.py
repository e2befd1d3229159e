"""Merging stored result blocks, filters, layer summaries, exports and the report."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest
from neurodissect.v1 import common_pb2, gateway_pb2

from services.common import keys
from services.common.store import LocalStore
from services.gateway import results
from services.gateway.report import render_report

JOB, LAYER = "0123456789abcdef", "layer4"


def nd(unit: int, label: str, iou: float, category: str = "object") -> dict[str, object]:
    return {"unit": unit, "label": label, "category": category, "iou": iou,
            "detector": iou >= 0.04, "exemplars": [unit, 9],
            "per_category": [{"category": category, "label": label, "iou": iou},
                             {"category": "color", "label": "red", "iou": 0.01}]}


@pytest.fixture()
def store(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path)
    put = store.put_json
    put(keys.result_block(JOB, LAYER, "netdissect", 0, 2),
        {"units": [nd(0, "dog", 0.20), nd(1, "sky", 0.02)]})
    put(keys.result_block(JOB, LAYER, "netdissect", 2, 4),
        {"units": [nd(2, "dog", 0.10), nd(3, "car <b>", 0.05, "part")]})
    put(keys.result_block(JOB, LAYER, "compositional", 0, 4), {"units": [
        {"unit": u, "formula": "(dog OR cat) AND NOT grass", "iou": 0.3, "length": 3}
        for u in range(4)]})
    put(keys.result_block(JOB, LAYER, "milan", 0, 4), {"units": [
        {"unit": u, "caption": f"furry animal faces {u}"} for u in range(4)]})
    put(keys.result_block(JOB, LAYER, "simulation", 0, 4), {"units": [
        {"unit": 0, "simulation": {"netdissect": 0.5, "milan": 0.2}},
        {"unit": 1, "simulation": {"netdissect": 0.3, "milan": "NaN"}},
        {"unit": 2, "simulation": {"netdissect": 0.1}, "dead": False},
        {"unit": 3, "simulation": {"netdissect": 0.9}, "dead": True}]})
    put(keys.result_summary(JOB, LAYER, "netdissect"), {"not": "a block"})
    return store


def test_blocks_merge_into_unit_results(store: LocalStore) -> None:
    units = results.unit_results(store, JOB, LAYER)
    assert [u.unit for u in units] == [0, 1, 2, 3]
    assert units[2].netdissect.label == "dog"
    assert units[2].compositional.length == 3
    assert not units[2].HasField("linear")
    assert units[1].milan.caption == "furry animal faces 1"
    assert units[2].simulation == {"netdissect": pytest.approx(0.1)}
    assert math.isnan(units[3].simulation["netdissect"])
    only = results.unit_results(store, JOB, LAYER, 1, 3)
    assert [u.unit for u in only] == [1, 2]


def test_an_answer_with_only_default_fields_is_still_an_answer(store: LocalStore) -> None:
    # A unit whose mask overlaps no label: empty formula, IoU 0, and the method did run.
    store.put_json(keys.result_block(JOB, LAYER, "linear", 0, 1), {"units": [{"unit": 0}]})
    (unit, *_) = results.unit_results(store, JOB, LAYER)
    assert unit.HasField("linear") and unit.linear == common_pb2.LinearResult()
    assert results.unit_dict(unit)["linear"]["explanation"] == ""


def test_coverage_needs_every_unit(store: LocalStore) -> None:
    assert results.covered(store, JOB, LAYER, "netdissect", 4)
    assert not results.covered(store, JOB, LAYER, "netdissect", 5)
    assert not results.covered(store, JOB, LAYER, "linear", 4)
    store.delete(keys.result_block(JOB, LAYER, "netdissect", 0, 2))
    assert not results.covered(store, JOB, LAYER, "netdissect", 4)


def test_filters(store: LocalStore) -> None:
    units = results.unit_results(store, JOB, LAYER)

    def kept(**filters: object) -> list[int]:
        request = gateway_pb2.ListUnitsRequest(**filters)  # type: ignore[arg-type]
        return [u.unit for u in units if results.matches(u, request)]

    assert kept(detectors_only=True) == [0, 2, 3]
    assert kept(min_iou=0.1) == [0, 2]
    assert kept(label="DOG") == [0, 1, 2, 3]  # a leaf of every formula
    assert kept(label="sky") == [1]
    assert kept(label="furry") == [0, 1, 2, 3]  # a caption word
    assert kept(label="grass", detectors_only=True) == [0, 2, 3]


def test_layer_summary(store: LocalStore) -> None:
    summary = results.layer_summary(LAYER, 4, results.unit_results(store, JOB, LAYER))
    assert (summary.units, summary.detectors, summary.unique_labels) == (4, 3, 2)
    assert dict(summary.detectors_per_category) == {"object": 2, "part": 1}
    assert summary.dead_units == 1
    assert summary.simulation_mean["netdissect"] == pytest.approx(0.3)
    assert summary.simulation_sem["netdissect"] == pytest.approx(0.2 / math.sqrt(3))
    assert summary.simulation_mean["milan"] == pytest.approx(0.2)
    assert summary.simulation_sem["milan"] == 0.0


def test_unit_dicts_have_one_key_per_method(store: LocalStore) -> None:
    row = results.unit_dict(results.unit_results(store, JOB, LAYER)[1])
    assert set(row) == {"unit", "netdissect", "compositional", "milan", "simulation"}
    assert row["netdissect"]["detector"] is False


def test_tally_csv_is_netdissect_lite_shaped(store: LocalStore) -> None:
    text = results.tally_csv(results.unit_results(store, JOB, LAYER))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0])[:9] == ["unit", "category", "label", "score", "object-label",
                                 "object-truth", "object-activation", "object-intersect",
                                 "object-iou"]
    assert [r["unit"] for r in rows] == ["1", "3", "4", "2"]  # 1-based, by score
    assert rows[0]["color-label"] == "red" and rows[2]["part-label"] == "car <b>"


def test_clip_dissect_and_milan_csv() -> None:
    unit = common_pb2.UnitResult(layer=LAYER, unit=5)
    unit.clip_dissect.label = "dog, small"
    unit.clip_dissect.score = 1.5
    unit.milan.caption = 'the "dog"'
    assert results.clip_dissect_csv(LAYER, [unit]) == (
        'layer,unit,description,similarity\nlayer4,5,"dog, small",1.500000\n')
    assert results.milan_csv(LAYER, [unit]) == 'layer,unit,description\nlayer4,5,"the ""dog"""\n'


def test_formula_leaves() -> None:
    assert results.formula_leaves("(water OR river) AND NOT blue") == ["water", "river", "blue"]
    assert results.formula_leaves("traffic_light") == ["traffic_light"]


def test_report_escapes_and_lists_every_method(store: LocalStore) -> None:
    units = results.unit_results(store, JOB, LAYER)
    job = common_pb2.Job(id=JOB, state=common_pb2.REPORTING)
    job.summary.append(results.layer_summary(LAYER, 4, units))
    page = render_report(job, {LAYER: units}, {9: "images/9.png"})
    assert "car &lt;b&gt;" in page and "car <b>" not in page
    assert "(dog OR cat) AND NOT grass" in page
    assert page.count('src="images/9.png"') == 4
    assert "0.3000 ± " in page
