from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from services.toyworld.layout import ImageSpec, ShapeSpec, TextureSpec, sample_spec
from services.toyworld.raster import PALETTE, rasterize, render_images, shape_mask
from services.toyworld.world import WORLD

GRID = (np.arange(200) + 0.5) / 200 - 0.5
DX, DY = np.meshgrid(GRID, GRID)


@pytest.mark.parametrize("kind", WORLD.shapes)
def test_shapes_fit_their_circumradius(kind: str) -> None:
    inside = shape_mask(kind, DX, DY, 0.4)
    assert inside.mean() > 0.1
    assert not inside[np.hypot(DX, DY) > 0.41].any()


def test_shapes_are_told_apart_by_their_masks() -> None:
    masks = [shape_mask(kind, DX, DY, 0.4) for kind in WORLD.shapes]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert (masks[i] != masks[j]).mean() > 0.02
    ring = masks[WORLD.shapes.index("ring")]
    assert not ring[np.hypot(DX, DY) < 0.2].any()


def test_sampling_is_deterministic_and_per_image() -> None:
    assert sample_spec(3, 10) == sample_spec(3, 10)
    assert sample_spec(3, 10) != sample_spec(3, 11)
    images, specs = render_images(seed=3, n_images=3, size=32, start=9)
    assert specs[1] == sample_spec(3, 10)
    assert (images[1] == rasterize(sample_spec(3, 10), 32).rgb).all()


def test_raster_layers_agree() -> None:
    spec = ImageSpec(
        background="green",
        pattern_color="white",
        texture=TextureSpec("stripes", angle=0.0, period=0.2, phase=0.0),
        shapes=(ShapeSpec("square", "red", 0.5, 0.5, 0.2, small=False),),
    )
    raster = rasterize(spec, 40)
    inside = raster.shape == 0
    assert (raster.color[inside] == WORLD.color_names.index("red")).all()
    assert (raster.rgb == PALETTE[raster.color]).all()
    assert raster.pattern.any() and not (raster.pattern & inside).any()
    assert (raster.color[raster.pattern] == WORLD.color_names.index("white")).all()
    assert not (raster.outline & ~inside).any() and not (raster.centre & ~inside).any()
    assert (raster.outline & raster.centre).any()
    plain = rasterize(dataclasses.replace(spec, texture=TextureSpec("plain")), 40)
    assert not plain.pattern.any()


def test_shapes_never_overlap_and_avoid_the_background_colour() -> None:
    for i in range(200):
        spec = sample_spec(0, i)
        assert 1 <= len(spec.shapes) <= 3
        for a, shape in enumerate(spec.shapes):
            assert shape.color != spec.background
            for other in spec.shapes[a + 1 :]:
                gap = np.hypot(shape.cx - other.cx, shape.cy - other.cy)
                assert gap > shape.radius + other.radius
