"""Occlusion and ablation specs: validation naming the field, results, summaries, the table."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest
from neurodissect.v1 import common_pb2

from services.common import result_store
from services.common.errors import InvalidArgument, NotFound
from services.common.settings import Settings
from services.common.store import LocalStore
from services.gateway import results
from services.gateway.validation import SpecValidator
from tests.unit.gateway.test_validation import describe, good

JOB, LAYER = "0123456789abcdef", "layer4"


@pytest.fixture()
def validator() -> SpecValidator:
    return SpecValidator(Settings(), describe)


def _spec(**fields: object) -> common_pb2.DissectionSpec:
    spec = good()
    spec.netdissect.SetInParent()
    for name, message in fields.items():
        getattr(spec, name).CopyFrom(message)
    return spec


@pytest.mark.parametrize(("spec", "field"), [
    (_spec(occlusion=common_pb2.OcclusionParams(fill="white")), "occlusion.fill"),
    (_spec(occlusion=common_pb2.OcclusionParams(max_regions=-1)), "occlusion.max_regions"),
    (_spec(occlusion=common_pb2.OcclusionParams(drop_threshold=1.5)), "occlusion.drop_threshold"),
    (_spec(ablation=common_pb2.AblationParams(variant="mean")), "ablation.variant"),
    (_spec(ablation=common_pb2.AblationParams(temperature=0.0)), "ablation.temperature"),
    (_spec(ablation=common_pb2.AblationParams(seed=-3)), "ablation.seed"),
])
def test_bad_values_name_their_field(
    validator: SpecValidator, spec: common_pb2.DissectionSpec, field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        validator.validate(spec)
    assert err.value.field == field


def test_what_the_checks_need_is_asked_for(validator: SpecValidator) -> None:
    occlusion_alone = good()
    occlusion_alone.occlusion.SetInParent()
    with pytest.raises(InvalidArgument, match="set netdissect") as err:
        validator.validate(occlusion_alone)
    assert err.value.field == "occlusion"
    on_classes = _spec(occlusion=common_pb2.OcclusionParams())
    on_classes.dataset.CopyFrom(common_pb2.DatasetSpec(kind="imagefolder", uri="/"))
    with pytest.raises(InvalidArgument, match="annotated regions"):
        validator.validate(on_classes)
    missing = _spec(ablation=common_pb2.AblationParams(labels_uri="/no/such/labels.csv"))
    with pytest.raises(NotFound) as found:
        validator.validate(missing)
    assert found.value.field == "ablation.labels_uri"
    spec, _ = validator.validate(_spec(occlusion=common_pb2.OcclusionParams(fill="mean"),
                                       ablation=common_pb2.AblationParams(variant="norm")))
    assert spec.occlusion.fill == "mean" and spec.ablation.variant == "norm"


def _stored(store: LocalStore) -> None:
    result_store.write_block(store, JOB, LAYER, "netdissect", 0, 2, [
        {"unit": u, "label": "red", "category": "color", "iou": 0.5, "detector": True}
        for u in range(2)
    ])
    result_store.write_block(store, JOB, LAYER, "occlusion", 0, 2, [
        result_store.message_row(0, common_pb2.OcclusionResult(
            top_concept="red", top_drop=0.9, matches_netdissect=True, own_drop=0.9,
            drops=[common_pb2.ConceptScore(concept="red", score=0.9)])),
        result_store.message_row(1, common_pb2.OcclusionResult(own_drop=math.nan)),
    ])
    result_store.write_block(store, JOB, LAYER, "ablation", 0, 2, [
        result_store.score_row("ablation", 0, {"netdissect": 0.25}),
        result_store.score_row("ablation", 1, {"netdissect": math.nan}),
    ])
    result_store.write_summary(store, JOB, LAYER, "occlusion", {"units": 2, "occlusion": {
        "fill": "mean", "concepts": 8, "regions": "800", "mean_correlation": 0.95,
        "detectors_tested": 2, "detectors_dropping": 1.0, "forward_passes": "960",
        "seconds": 5.5}})
    result_store.write_summary(store, JOB, LAYER, "ablation", {
        "units": 2, "ablation_mean": {"netdissect": 0.25}, "ablation_sem": {"netdissect": 0.0},
        "ablation_note": ""})


def test_results_carry_occlusion_and_ablation(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _stored(store)
    units = results.unit_results(store, JOB, LAYER)
    assert units[0].occlusion.top_concept == "red" and units[0].occlusion.matches_netdissect
    assert math.isnan(units[1].occlusion.own_drop)
    assert units[0].ablation["netdissect"] == 0.25 and math.isnan(units[1].ablation["netdissect"])
    assert results.unit_dict(units[0])["ablation"] == {"netdissect": 0.25}
    table = list(csv.DictReader(io.StringIO(results.table_csv(LAYER, units))))
    assert table[0]["occlusion_top_concept"] == "red" and table[0]["ablation_netdissect"]
    summary = result_store.layer_summary(store, JOB, LAYER, 2)
    rows = dict(results.summary_rows(summary))
    assert rows["occlusion (mean fill)"] == (
        "800 regions of 8 concepts, 960 forward passes, 5.5 s")
    assert rows["occlusion ρ(drop, IoU), mean over concepts"] == "0.950"
    assert rows["detectors dropping for their own label"] == "100% of 2"
    assert rows["ablation α netdissect"] == "0.250 ± 0.000"


def test_a_row_that_is_no_score_map_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ablation row"):
        result_store.write_block(LocalStore(tmp_path), JOB, LAYER, "ablation", 0, 1,
                                 [{"unit": 0, "simulation": {"netdissect": 0.1}}])
