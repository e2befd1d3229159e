from __future__ import annotations

import numpy as np
import torch

from services.toyworld.generator import label_planes
from services.toyworld.planted import DEAD_UNIT, planted_model, planted_units
from services.toyworld.preprocessing import imagenet_normalize
from services.toyworld.raster import PALETTE, render_images
from services.toyworld.world import WORLD
from tests.fixtures.planted_outputs import planted_output


def colors_layer(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> the `colors` layer output (N, 9, S/2, S/2)."""
    return planted_output(images, "colors")


def test_planted_units_name_every_colour_once() -> None:
    units = planted_units()
    assert sorted(units.values()) == sorted(WORLD.color_names)
    assert DEAD_UNIT not in units
    assert all(name in WORLD.numbers for name in units.values())


def test_a_red_image_fires_the_red_unit_only() -> None:
    red = np.broadcast_to(np.array(WORLD.rgb("red"), dtype=np.uint8), (1, 16, 16, 3))
    acts = colors_layer(red)
    assert acts.shape == (1, len(WORLD.colors) + 1, 8, 8)
    red_unit = next(u for u, name in planted_units().items() if name == "red")
    assert acts[0, red_unit].min() > 0.5
    others = [u for u in range(acts.shape[1]) if u != red_unit]
    assert acts[0, others].max() < 1e-4


def test_each_unit_fires_exactly_on_its_colour_in_toy_images() -> None:
    images, _ = render_images(seed=5, n_images=8, size=64)
    acts = colors_layer(images).numpy()  # (8, 9, 32, 32)
    blocks = images.reshape(8, 32, 2, 32, 2, 3)
    for unit, name in planted_units().items():
        is_color = (blocks == PALETTE[WORLD.color_names.index(name)]).all(axis=-1)
        count = is_color.sum(axis=(2, 4))  # (8, 32, 32) matching pixels per 2×2 block
        assert (acts[:, unit][count == 4] > 0.5).all()
        assert (acts[:, unit][count == 0] < 1e-4).all()
    assert (acts[:, DEAD_UNIT] == 0).all()


def test_top_activations_spread_over_the_colour() -> None:
    # A 0.5% threshold must pick pixels all over a uniform red image, not one tie or none.
    red = np.broadcast_to(np.array(WORLD.rgb("red"), dtype=np.uint8), (4, 64, 64, 3))
    acts = colors_layer(red)[:, 0].flatten()
    threshold = torch.quantile(acts, 0.995)
    assert 0 < int((acts > threshold).sum()) < acts.numel() // 50


def test_output_is_the_spatial_mean() -> None:
    images, _ = render_images(seed=6, n_images=2, size=32)
    with torch.no_grad():
        out = planted_model()(imagenet_normalize(images))
    assert torch.allclose(out, colors_layer(images).mean(dim=(2, 3)))
    assert planted_model().state_dict() == {}


def test_iou_at_the_default_quantile_names_every_planted_unit() -> None:
    # A minimal NetDissect (top 0.5% threshold, dataset-level IoU over all images): the best
    # label of each planted unit must be its colour, the answer an end-to-end run must give.
    images, specs = render_images(seed=9, n_images=400, size=64)
    acts = colors_layer(images)  # (N, 9, 32, 32), already at mask resolution
    planes = np.stack([label_planes(spec, 32) for spec in specs])  # (N, 4, 32, 32)
    n_labels = len(WORLD.labels) + 1
    present = np.zeros((len(specs), n_labels, 32, 32), dtype=bool)
    for i, spec in enumerate(specs):
        for plane in planes[i]:
            present[i, plane, np.arange(32)[:, None], np.arange(32)] = True
        present[i, WORLD.numbers[spec.texture.kind]] = True
        present[i, WORLD.numbers[WORLD.scenes[spec.scene]]] = True
    present[:, 0] = False
    for unit, name in planted_units().items():
        a = acts[:, unit]
        mask = (a > torch.quantile(a.flatten(), 0.995)).numpy()
        inter = (present & mask[:, None]).sum(axis=(0, 2, 3))
        iou = inter / (mask.sum() + present.sum(axis=(0, 2, 3)) - inter)
        assert WORLD.labels[int(iou.argmax()) - 1].name == name


def test_region_units_keep_each_colours_whole_region_at_one_gain_per_image() -> None:
    images, _ = render_images(seed=7, n_images=6, size=48)
    acts = planted_output(images, "regions").numpy()  # (6, 8, 48, 48)
    assert acts.shape == (6, len(WORLD.colors), 48, 48)
    for unit, name in planted_units().items():
        region = (images == PALETTE[WORLD.color_names.index(name)]).all(axis=-1)
        share = region.mean(axis=(1, 2))
        expected = region * (1 + share)[:, None, None]
        np.testing.assert_allclose(acts[:, unit], expected, atol=1e-4)
        # Any threshold between 0 and an image's gain keeps exactly its colour region.
        for i in np.flatnonzero(share):
            assert np.array_equal(acts[i, unit] > 1.0, region[i])
