"""Merging stored result blocks, filters, layer summaries, exports and the report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from neurodissect.v1 import common_pb2, gateway_pb2

from services.common import keys, result_store
from services.common.errors import InvalidArgument, NotFound
from services.common.store import LocalStore
from services.gateway import results

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
    assert result_store.covered(store, JOB, LAYER, "netdissect", 4)
    assert not result_store.covered(store, JOB, LAYER, "netdissect", 5)
    assert not result_store.covered(store, JOB, LAYER, "linear", 4)
    store.delete(keys.result_block(JOB, LAYER, "netdissect", 0, 2))
    assert not result_store.covered(store, JOB, LAYER, "netdissect", 4)


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


def test_layer_summary_holds_the_figures_of_the_methods_that_stored_one(
    store: LocalStore,
) -> None:
    result_store.write_summary(store, JOB, LAYER, "netdissect", {
        "units": 4, "detectors": 3, "unique_labels": 2,
        "detectors_per_category": {"object": 2, "part": 1}})
    result_store.write_summary(store, JOB, LAYER, "simulation", {
        "units": 4, "dead_units": 1, "simulation_mean": {"netdissect": 0.3},
        "simulation_sem": {"netdissect": 0.1}, "simulator": "labels"})
    summary = result_store.layer_summary(store, JOB, LAYER, 5)
    assert list(summary.methods) == ["netdissect", "simulation"]
    assert (summary.layer, summary.units, summary.detectors, summary.unique_labels) == (
        LAYER, 5, 3, 2)
    assert dict(summary.detectors_per_category) == {"object": 2, "part": 1}
    assert summary.dead_units == 1 and dict(summary.simulation_mean) == {"netdissect": 0.3}
    assert dict(results.summary_rows(summary))["simulation ρ netdissect"] == "0.300 ± 0.100"


def test_summary_rows_show_only_the_methods_that_ran() -> None:
    only_clip = common_pb2.LayerSummary(layer=LAYER, units=8, methods=["clip_dissect"])
    assert results.summary_rows(only_clip) == [("units", "8")]
    dissected = common_pb2.LayerSummary(layer=LAYER, units=8, detectors=0, methods=["netdissect"])
    assert ("NetDissect detectors", "0") in results.summary_rows(dissected)
    assert "dead units" not in dict(results.summary_rows(dissected))


def test_unit_dicts_have_one_key_per_method(store: LocalStore) -> None:
    row = results.unit_dict(results.unit_results(store, JOB, LAYER)[1])
    assert set(row) == {"unit", "netdissect", "compositional", "milan", "simulation"}
    assert row["netdissect"]["detector"] is False


def test_exports_are_served_as_their_method_stored_them(store: LocalStore) -> None:
    with pytest.raises(NotFound) as caught:
        result_store.read_export(store, JOB, LAYER, "tally")
    assert caught.value.field == "layer" and "netdissect did not run" in str(caught.value)
    result_store.write_export(store, JOB, LAYER, "tally", "unit,category\n1,object\n")
    assert store.exists(f"results/{JOB}/{LAYER}/netdissect/tally.csv")
    assert result_store.read_export(store, JOB, LAYER, "tally") == b"unit,category\n1,object\n"
    with pytest.raises(InvalidArgument) as caught:
        result_store.read_export(store, JOB, LAYER, "gradcam")
    assert caught.value.field == "format"


def test_formula_leaves() -> None:
    assert results.formula_leaves("(water OR river) AND NOT blue") == ["water", "river", "blue"]
    assert results.formula_leaves("traffic_light") == ["traffic_light"]


def test_significant_only_keeps_units_whose_label_passes_and_rows_show_the_checks(
    store: LocalStore,
) -> None:
    store.put_json(keys.result_block(JOB, LAYER, "significance", 0, 4), {"units": [
        {"unit": u, "label": "dog", "z": 6.0 - u, "p_value": 1e-9, "significant": u < 2}
        for u in range(4)]})
    units = results.unit_results(store, JOB, LAYER)
    request = gateway_pb2.ListUnitsRequest(significant_only=True, detectors_only=True)
    assert [u.unit for u in units if results.matches(u, request)] == [0]
    assert "significance_z" in results.table_csv(LAYER, units).splitlines()[0]
    result_store.write_summary(store, JOB, LAYER, "significance", {
        "units": 4, "significant_detectors": 1, "q": 0.05})
    result_store.write_summary(store, JOB, LAYER, "threshold_sweep", {"units": 4, "sweep": [
        {"threshold": 0.005, "detectors": 3, "unique_labels": 2, "unchanged_fraction": 1.0}]})
    rows = dict(results.summary_rows(result_store.layer_summary(store, JOB, LAYER, 4)))
    assert rows["significant detectors (Benjamini–Hochberg)"] == "1"
    assert rows["sweep 0.005"] == "3 detectors, 2 labels, 100% unchanged"
