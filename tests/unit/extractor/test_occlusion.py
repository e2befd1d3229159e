"""Occlusion's model step: regions, fills, the ratio of sums, and the planted model's drops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.common import keys
from services.common.errors import FailedPrecondition
from services.common.probe_format import read_concepts
from services.common.settings import Settings
from services.common.store import LocalStore
from services.extractor.broden import read_broden
from services.extractor.extraction import ComputeConfig, Extraction
from services.extractor.models import resolve_model
from services.extractor.occlusion import (
    DeltaTally,
    Occlusion,
    OcclusionConfig,
    OcclusionOutcome,
    occluded,
    sample_regions,
)
from services.extractor.preprocessing import preprocessing
from services.toyworld.generator import generate
from services.toyworld.planted import planted_units
from services.toyworld.world import WORLD

COMPUTE = ComputeConfig(batch_size=32, image_chunk=24)


@pytest.fixture(scope="module")
def world64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 toy images at the toy world's default 64 px (its label maps at 32 px)."""
    return generate(tmp_path_factory.mktemp("toy64") / "world", 160, 64, seed=0)


def test_ratio_of_sums_and_silent_units() -> None:
    tally = DeltaTally(n_concepts=2, n_units=3)
    original = np.array([[2.0, 0.0, 1.0], [4.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    after = np.array([[1.0, 0.0, 2.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.0]])
    tally.add(np.array([0, 0, 1]), original, after)
    delta = tally.delta()  # (U, C)
    assert delta[0, 0] == pytest.approx((-1.0 - 4.0) / 6.0)  # not the mean of -0.5 and -1
    assert delta[2, 0] == pytest.approx(1.0 / 2.0)
    assert np.isnan(delta[1, 0])  # silent on every image of concept 0: no δ
    assert np.isnan(delta[2, 1]) and delta[0, 1] == 0.0
    np.testing.assert_array_equal(tally.regions, [2, 1])


def test_sampling_is_seeded_and_bounded() -> None:
    regions = np.stack([np.arange(100), np.arange(100) % 7], axis=1)
    first = sample_regions(regions, 10, seed=4)
    assert len(first) == 10 and np.all(np.diff(first[:, 0]) > 0)
    np.testing.assert_array_equal(first, sample_regions(regions, 10, seed=4))
    assert not np.array_equal(first, sample_regions(regions, 10, seed=5))
    assert sample_regions(regions, 200, seed=4) is regions


def test_fills_replace_only_the_region_in_raw_pixels() -> None:
    prep = preprocessing("imagenet", 4)
    pixels = torch.full((3, 4, 4), 200, dtype=torch.uint8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2] = True
    black = occluded(pixels, mask, "black", prep)
    assert black[:, :2].eq(0).all() and black[:, 2:].eq(200).all()
    mean = occluded(pixels, mask, "mean", prep)
    assert mean[:, 0, 0].tolist() == [124, 116, 104]  # ImageNet's mean, 0 once normalised
    blurred = torch.full_like(pixels, 7)
    assert occluded(pixels, mask, "blur", prep, blurred)[:, :2].eq(7).all()


def _planted_run(
    tmp_path: Path, toy_root: Path, fill: str, max_regions: int = 800
) -> tuple[LocalStore, dict[str, np.ndarray], list[str], Occlusion]:
    store = LocalStore(tmp_path / "store")
    dataset = read_broden(toy_root)
    source = resolve_model("toy", "planted", "", 0, Settings(cache_dir=str(tmp_path / "c")))
    list(Extraction(store, dataset, source, ["colors"], COMPUTE).run())
    occlusion = Occlusion(
        store, dataset, source, ["colors"], COMPUTE, OcclusionConfig(fill, max_regions, 0)  # type: ignore[arg-type]
    )
    events = list(occlusion.run())
    assert isinstance(events[-1], OcclusionOutcome) and not events[-1].cached
    stored = store.get_arrays(events[-1].keys["colors"])
    names = read_concepts(store, occlusion.dataset_key).label_names()
    return store, stored, [names[int(n)] for n in stored["labels"]], occlusion


@pytest.mark.parametrize("fill", ["mean", "black"])
def test_planted_colour_units_drop_for_their_colour_only(
    tmp_path: Path, world64: Path, fill: str
) -> None:
    store, stored, names, occlusion = _planted_run(tmp_path, world64, fill)
    delta = stored["delta"]  # (U, C)
    forward_passes, seconds = stored["cost"]
    assert forward_passes > stored["regions"].sum() and seconds > 0
    for unit, colour in planted_units().items():
        if fill == "black" and colour == "black":
            continue  # the palette's black (20, 20, 20) still half-matches a black fill
        own = delta[unit, names.index(colour)]
        assert own <= -0.8, (unit, colour, own)
        for other in planted_units().values():
            if other == colour or other not in names:
                continue
            # Label maps are at half resolution: hiding a region hides the 2×2 blocks
            # whose centre has its colour, edges of thin stripes and dots included, so
            # a pattern colour (white, black) next to another costs that one up to ~11%
            # (measured on 300 images); 10% holds between the other colours.
            bound = 0.15 if {colour, other} & set(WORLD.pattern_colors) else 0.1
            assert delta[unit, names.index(other)] >= -bound, (colour, other)
    assert np.isnan(delta[len(planted_units())]).all()  # the dead unit has no δ
    # A second run is a cache hit and loads no model.
    again = list(Occlusion(store, occlusion.dataset, occlusion.model_source, ["colors"],
                           COMPUTE, occlusion.config).run())
    assert again == [OcclusionOutcome({"colors": keys.occlusion(occlusion.key, "colors")}, True)]


def test_unextracted_dataset_is_refused(tmp_path: Path, toy_root: Path) -> None:
    source = resolve_model("toy", "planted", "", 0, Settings(cache_dir=str(tmp_path / "c")))
    occlusion = Occlusion(LocalStore(tmp_path / "s"), read_broden(toy_root), source, ["colors"],
                          COMPUTE, OcclusionConfig("black", 10, 0))
    with pytest.raises(FailedPrecondition, match="Extract"):
        list(occlusion.run())


def test_the_blur_fill_runs_and_hides_exact_colours(tmp_path: Path, toy_root: Path) -> None:
    _, stored, names, _ = _planted_run(tmp_path, toy_root, "blur", max_regions=60)
    delta = stored["delta"]
    assert stored["regions"].sum() == 60
    # A blurred region's pixels leave the palette (σ = 0.06): colour units lose most.
    own = [delta[u, names.index(c)] for u, c in planted_units().items() if c in names]
    assert np.nanmean(own) < -0.5, own
