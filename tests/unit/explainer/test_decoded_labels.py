"""Label maps decoded once per grid and stored: the tally they give equals the label maps'."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray

from services.common import keys
from services.common.probe_format import Concept, ConceptTable, LabelChunk, write_label_chunk
from services.common.settings import Settings
from services.common.store import LocalStore
from services.explainer import decoded_labels, sharding, unit_masks
from services.explainer.netdissect import IoUTally, TallyCounts, unit_thresholds
from tests.unit.explainer.test_netdissect import CATEGORIES, random_probe

N_IMAGES, N_UNITS, CHUNK, MASK = 26, 70, 8, 28


def _table(label_categories: np.ndarray) -> ConceptTable:
    return ConceptTable(
        dataset_key="ds",
        categories=list(CATEGORIES),
        labels=[
            Concept(number, f"l{number}", CATEGORIES[c] if c >= 0 else "material")
            for number, c in enumerate(label_categories.tolist())
            if number > 0
        ],
        n_images=N_IMAGES,
        image_size=(2 * MASK, 2 * MASK),
        mask_size=(MASK, MASK),
        chunk_size=CHUNK,
        plane_categories=["object", "part", "color"],
    )


@pytest.fixture()
def probe(tmp_path: Path) -> tuple[LocalStore, ConceptTable, np.ndarray, np.ndarray, np.ndarray]:
    """A stored probe set (several planes, image-level labels) and (N, U, 7, 7) activations."""
    rng = np.random.default_rng(11)
    pixel, image, label_categories = random_probe(rng, N_IMAGES, MASK, 4, 30)
    store = LocalStore(tmp_path / "store")
    table = _table(label_categories)
    for i0, i1 in table.chunk_ranges():
        write_label_chunk(store, "ds", LabelChunk(i0, pixel[i0:i1], image[i0:i1]))
    acts = rng.standard_normal((N_IMAGES, N_UNITS, 7, 7)).astype(np.float32)
    return store, table, pixel, image, acts


def _tally_fields(counts: TallyCounts) -> dict[str, np.ndarray]:
    return {
        name: getattr(counts, name)
        for name in ("intersection", "label_area", "mask_area", "mask_area_lite",
                     "mask_area_netdissect", "top_images", "top_values")
    }


def test_the_stored_decoded_labels_tally_as_the_label_maps_for_any_unit_block(
    probe: tuple[LocalStore, ConceptTable, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    store, table, pixel, image, acts = probe
    categories = table.label_categories()
    band_start = decoded_labels.grid_bands(table, (7, 7))
    for block in (1, 7, 64, N_UNITS):
        for u0 in range(0, N_UNITS, block):
            part = acts[:, u0 : u0 + block]
            thresholds = unit_thresholds(lambda p=part: iter([p]))  # type: ignore[misc]
            # today's tally: every block decodes the label maps itself
            expected = IoUTally(thresholds, categories, len(CATEGORIES), first_unit=u0)
            stored = IoUTally(thresholds, categories, len(CATEGORIES), first_unit=u0)
            for i0, i1 in table.chunk_ranges():
                expected.update(part[i0:i1], LabelChunk(i0, pixel[i0:i1], image[i0:i1]))
                labels = decoded_labels.read_decoded(store, table, band_start, i0, i1)
                stored.add(unit_masks.count_decoded(part[i0:i1], labels, thresholds))
            want, got = _tally_fields(expected.result()), _tally_fields(stored.result())
            for name, value in want.items():
                np.testing.assert_array_equal(got[name], value, err_msg=f"{block} {u0} {name}")


def test_each_chunk_is_decoded_once_and_read_back_after(
    probe: tuple[LocalStore, ConceptTable, np.ndarray, np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, table, *_ = probe
    band_start = decoded_labels.grid_bands(table, (7, 7))
    decoded: list[int] = []
    decode = decoded_labels.decode_labels

    def counting(labels: LabelChunk, *args: np.ndarray) -> unit_masks.DecodedLabels:
        decoded.append(labels.i0)
        return decode(labels, *args)

    monkeypatch.setattr(decoded_labels, "decode_labels", counting)
    ranges = table.chunk_ranges()
    first = [decoded_labels.read_decoded(store, table, band_start, *r) for r in ranges]
    again = [decoded_labels.read_decoded(store, table, band_start, *r) for r in ranges]
    assert decoded == [i0 for i0, _ in table.chunk_ranges()]
    digest = decoded_labels.decoded_key(table, band_start)
    assert store.exists(keys.decoded_labels("ds", digest, 0, CHUNK))
    for a, b in zip(first, again, strict=True):
        assert a.i0 == b.i0
        np.testing.assert_array_equal(a.sets.pixel_set, b.sets.pixel_set)
        np.testing.assert_array_equal(a.sets.rows, b.sets.rows)
        for (ga, ca), (gb, cb) in zip(a.groups, b.groups, strict=True):
            np.testing.assert_array_equal(ga.first_set, gb.first_set)
            for name in ("first", "last", "split", "segment", "segment_start"):
                np.testing.assert_array_equal(getattr(ca, name), getattr(cb, name))


def test_the_key_names_the_grid_rows_and_the_selected_categories(
    probe: tuple[LocalStore, ConceptTable, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    _, table, *_ = probe
    seven = decoded_labels.decoded_key(table, decoded_labels.grid_bands(table, (7, 7)))
    # the banding of rows decides; the columns' size does not enter the decoded labels
    assert seven == decoded_labels.decoded_key(table, decoded_labels.grid_bands(table, (7, 3)))
    assert seven != decoded_labels.decoded_key(table, decoded_labels.grid_bands(table, (14, 14)))
    fewer = _table(np.where(table.label_categories() == 1, -1, table.label_categories()))
    assert seven != decoded_labels.decoded_key(fewer, decoded_labels.grid_bands(fewer, (7, 7)))


def test_labels_decoded_for_another_grid_are_refused(
    probe: tuple[LocalStore, ConceptTable, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    store, table, _, _, acts = probe
    labels = decoded_labels.read_decoded(
        store, table, decoded_labels.grid_bands(table, (14, 14)), 0, CHUNK
    )
    with pytest.raises(ValueError, match="another grid"):
        unit_masks.count_decoded(acts[:CHUNK], labels, np.zeros(N_UNITS, np.float32))


@pytest.fixture()
def local_ray() -> Iterator[None]:
    ray.shutdown()  # a Ray left connected by another module would be reused
    sharding.connect(Settings(ray_num_cpus=2))
    yield
    ray.shutdown()


def test_missing_chunks_are_decoded_by_tasks_and_a_later_job_decodes_none(
    local_ray: None,
    probe: tuple[LocalStore, ConceptTable, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    store, table, *_ = probe
    band_start = decoded_labels.grid_bands(table, (7, 7))
    digest = decoded_labels.decoded_key(table, band_start)
    decoded_labels.read_decoded(store, table, band_start, 0, CHUNK)  # one chunk stored already
    settings = Settings(store_url=store.url)

    def steps() -> list[str]:
        return list(decoded_labels.store_missing(settings, store, table, band_start, lambda: True))

    first = steps()
    assert len(first) == len(table.chunk_ranges()) - 1
    assert first[-1].endswith(f"{N_IMAGES}/{N_IMAGES} images")
    for i0, i1 in table.chunk_ranges():
        assert store.exists(keys.decoded_labels("ds", digest, i0, i1))
    assert steps() == []
