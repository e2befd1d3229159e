"""The spatial mode of the compositional method end to end: params, preset, stage, export."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from neurodissect.v1 import common_pb2, explainer_pb2

from services.common import result_store
from services.common.errors import InvalidArgument
from services.common.settings import Settings
from services.common.spec_vocabulary import (
    COMPOSITIONAL_MODES,
    COMPOSITIONAL_PRESETS,
    FORMULA_SCORES,
    GRID_DOWNSAMPLINGS,
    OPERATOR_SETS,
)
from services.common.store import LocalStore
from services.explainer import sharding
from services.explainer.explain_plan import plan_request
from services.explainer.methods import EXPLAINER_METHODS
from services.explainer.methods.compositional import Compositional
from services.explainer.servicer import explain
from services.explainer.spatial_formulas import (
    Close,
    CloseTo,
    Primitive,
    UnitMask,
    explain_unit,
    format_formula,
    primitives,
)
from services.explainer.spatial_masks import Grid, expand, label_grid_masks
from services.toyworld.generator import label_planes
from services.toyworld.planted import NEAR
from services.toyworld.raster import render_images
from services.toyworld.world import WORLD
from tests.fixtures.planted_layer import OBJECTS, TOP_QUANTILE, PlantedLayer, write_planted
from tests.fixtures.planted_outputs import planted_output


def _spec(**fields: object) -> common_pb2.DissectionSpec:
    spec = common_pb2.DissectionSpec(
        model=common_pb2.ModelSpec(source="toy", name="toynet"),
        layers=["conv"],
        dataset=common_pb2.DatasetSpec(kind="toyworld"),
        compute=common_pb2.ComputeSpec(unit_block_size=8),
    )
    spec.compositional.SetInParent()
    for name, value in fields.items():
        setattr(spec.compositional, name, value)
    return spec


def test_the_indres_preset_sets_every_reference_value_and_fields_override_it() -> None:
    params = Compositional().params(_spec(preset="indres"))
    assert params.spatial is not None
    search = params.spatial.search
    assert (search.beam, search.top_k, search.max_length) == (4, 50, 3)
    assert (search.score, search.r, search.operators) == ("imroun", 0.75, "close")
    assert search.linear_length_penalty == 0.001 and search.length_penalty == 1.0
    assert params.spatial.downsampling == "manual"
    assert params.spatial.manual_fraction == 100 / 256
    assert params.spatial.expansion_neighbours == 3
    overridden = Compositional().params(_spec(preset="indres", beam=7, score="iou"))
    assert overridden.spatial is not None
    assert (overridden.spatial.search.beam, overridden.spatial.search.score) == (7, "iou")
    # Outside the preset the spatial mode keeps the core's beam and candidates.
    plain = Compositional().params(_spec(mode="spatial"))
    assert plain.spatial is not None
    assert (plain.spatial.search.beam, plain.spatial.search.top_k) == (5, None)
    assert plain.spatial.search.linear_length_penalty == 0.0
    assert Compositional().params(_spec()).spatial is None


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"score": "iou"}, "score"),
        ({"preset": "compexp"}, "preset"),
        ({"mode": "spatial", "operators": "near"}, "operators"),
        ({"mode": "spatial", "manual_fraction": 0.0}, "manual_fraction"),
        ({"mode": "spatial", "expansion_neighbours": 9}, "expansion_neighbours"),
        ({"mode": "spatial", "linear_length_penalty": 0.9}, "linear_length_penalty"),
    ],
)
def test_the_explainer_refuses_fields_naming_them(fields: dict, field: str) -> None:
    spec = _spec(**fields)
    with pytest.raises(InvalidArgument) as refused:
        Compositional().params(spec)
    assert refused.value.field == f"spec.compositional.{field}"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.shutdown()
    sharding.connect(Settings(ray_num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture()
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def _run(store: LocalStore, planted: PlantedLayer, spec: common_pb2.DissectionSpec, job: str
         ) -> None:
    spec.compositional.top_quantile = TOP_QUANTILE
    request = explainer_pb2.ExplainRequest(
        job_id=job,
        layer=planted.layer,
        methods=["compositional"],
        spec=spec,
        dataset_key=planted.dataset_key,
        acts_key=planted.acts_key,
    )
    plan = plan_request(store, request, EXPLAINER_METHODS)
    progress = list(explain(Settings(store_url=store.url), store, plan))
    assert progress[-1].finished


def test_the_preset_explains_planted_units_and_exports_the_reference_table(
    local_ray: None, store: LocalStore
) -> None:
    planted = write_planted(store)
    _run(store, planted, _spec(preset="indres"), "indres")
    rows = result_store.read_rows(store, "indres", planted.layer, "compositional")
    # The grid masks are stored once per dataset and settings; a second job reads them.
    stored = store.list(f"probe/{planted.dataset_key}/grid/")
    assert len(stored) == 1
    _run(store, planted, _spec(preset="indres"), "indres-again")
    assert store.list(f"probe/{planted.dataset_key}/grid/") == stored
    again = result_store.read_rows(store, "indres-again", planted.layer, "compositional")
    assert again == rows
    assert sorted(rows) == list(range(planted.n_units))
    export = result_store.export_key("indres", planted.layer, "compositional")
    table = list(csv.DictReader(io.StringIO(store.get(export).decode())))
    assert list(table[0]) == ["neuron", "category", "formula", "threshold"]
    assert [int(r["neuron"]) for r in table] == list(range(planted.n_units))
    for unit, name in enumerate(planted.planted):
        row = rows[unit]
        assert table[unit]["formula"] == row["formula"]
        assert float(table[unit]["threshold"]) == pytest.approx(row["threshold"], rel=1e-5)
        if name in OBJECTS:  # object units: a formula naming their label, scored high
            assert name in row["formula"], (unit, row)
            assert row["imroun"] > 0.5 and row["category"] == "object"


# Every value of every spatial enum.
SPATIAL_ENUMS = {
    "mode": COMPOSITIONAL_MODES,
    "preset": tuple(COMPOSITIONAL_PRESETS),
    "grid_downsampling": GRID_DOWNSAMPLINGS,
    "score": FORMULA_SCORES,
    "operators": OPERATOR_SETS,
}


@pytest.mark.parametrize(
    ("field", "value"), [(f, v) for f, values in SPATIAL_ENUMS.items() for v in values]
)
def test_every_spatial_enum_value_runs_to_completion(
    local_ray: None, store: LocalStore, field: str, value: str
) -> None:
    fields = {field: value} if field in ("mode", "preset") else {"mode": "spatial", field: value}
    spec = _spec(**fields)
    planted = write_planted(store, n_images=40, n_units=8, image_chunk=20)
    _run(store, planted, spec, f"{field}-{value}")
    assert result_store.covered(store, f"{field}-{value}", planted.layer, "compositional", 8)


def test_the_planted_near_unit_is_a_close_formula_naming_the_shape_and_the_colour() -> None:
    # The planted model's `near` unit fires on rings only within 2 positions of blue.
    images, specs = render_images(seed=11, n_images=400, size=32)
    acts = planted_output(images, "near")[:, 0].numpy()  # (400, 16, 16)
    # Every firing position is ≥ 0.25 (half a 2×2 block of ring at gain ≥ 0.5); elsewhere 0.
    grid = Grid(*acts.shape[1:])
    unit = UnitMask(grid.pack(acts > 0.1), grid.cells)
    # Label masks at mask resolution 32, downsampled to the 16×16 grid as the method does.
    pixel = np.stack([label_planes(spec, 32) for spec in specs]).astype(np.int32)
    image = np.array(
        [[WORLD.numbers[s.texture.kind], WORLD.numbers[WORLD.scenes[s.scene]]] for s in specs],
        dtype=np.int32,
    )
    labels = np.array([label.number for label in WORLD.labels])
    masks = label_grid_masks(pixel, image, labels, grid)
    pixel_level = [
        k for k, label in enumerate(WORLD.labels)
        if not set(label.categories) & {"texture", "scene"}
    ]
    candidates = [Primitive(int(n)) for n in labels] + [
        Primitive(int(labels[k]), expanded=True) for k in pixel_level
    ]
    masks = np.concatenate([masks, grid.pack(expand(grid.unpack(masks[pixel_level]), 3))])
    preset = Compositional().params(_spec(preset="indres")).spatial
    assert preset is not None
    spatial = explain_unit(unit, candidates, masks, grid, preset.search)
    # Without spatial operators, even a beam as wide as the candidate list (every formula
    # of length 2 is tried) stays below: its best, `ring AND blue-X`, approximates "near
    # blue" by one dilation of blue (0.69 against 0.77 when written).
    boolean = explain_unit(unit, candidates, masks, grid, dataclasses.replace(
        preset.search, operators="boolean", beam=len(candidates)))
    assert isinstance(spatial.formula, CloseTo | Close)
    names = {label.number: label.name for label in WORLD.labels}
    named = {names[p.label] for p in primitives(spatial.formula)}
    assert set(NEAR) <= named, format_formula(spatial.formula, names)
    assert spatial.imroun > 0.6
    assert spatial.imroun > boolean.imroun + 0.05

