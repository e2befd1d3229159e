from __future__ import annotations

import numpy as np
import pytest
from neurodissect.v1 import common_pb2
from PIL import Image

from services.explainer.compositional import And, Formula, Leaf, Not, Or, format_formula
from services.gateway.webui import figures, masks, render

NAMES = {1: "water", 2: "river", 3: "blue", 4: "red plain", 5: "and more", 6: 'odd "name"'}


def _explainer_mask(formula: Formula, leaves: dict[int, np.ndarray]) -> np.ndarray:
    if isinstance(formula, Leaf):
        return leaves[formula.label]
    if isinstance(formula, Not):
        return ~_explainer_mask(formula.operand, leaves)
    left, right = _explainer_mask(formula.left, leaves), _explainer_mask(formula.right, leaves)
    return left & right if isinstance(formula, And) else left | right


FORMULAS = [
    Or(Leaf(1), Leaf(2)),
    And(Or(Leaf(1), Leaf(2)), Not(Leaf(3))),
    Or(Leaf(1), And(Leaf(2), Not(Leaf(4)))),
    And(Not(Or(Leaf(5), Leaf(6))), Leaf(4)),
    Or(And(Leaf(1), Leaf(3)), And(Leaf(2), Leaf(4))),
]


@pytest.mark.parametrize("formula", FORMULAS)
def test_formula_masks_agree_with_the_explainers_formulas(formula: Formula) -> None:
    rng = np.random.default_rng(0)
    leaves = {n: rng.random(64) < 0.5 for n in NAMES}
    by_name = {name: leaves[n] for n, name in NAMES.items()}
    text = format_formula(formula, NAMES)
    assert np.array_equal(masks.formula_mask(text, by_name.__getitem__),
                          _explainer_mask(formula, leaves)), text


@pytest.mark.parametrize("text", ["water OR", "(water", "water )", "AND water", 'water "x'])
def test_a_malformed_formula_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        masks.formula_mask(text, lambda name: np.ones(4, dtype=bool))
    assert not masks.is_logical_formula(text)


def test_only_formulas_of_the_boolean_mode_are_drawn() -> None:
    assert masks.is_logical_formula("(water OR river) AND NOT blue")
    # Spatial formulas live on the activation grid: the job's mode says so, set or preset.
    assert figures.spatial_mode(common_pb2.CompositionalParams(mode="spatial"))
    assert figures.spatial_mode(common_pb2.CompositionalParams(preset="indres"))
    assert not figures.spatial_mode(common_pb2.CompositionalParams(mode="boolean"))
    assert not figures.spatial_mode(common_pb2.CompositionalParams())


def test_unit_mask_is_pils_bilinear_resize_thresholded() -> None:
    raw = np.array([[0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    mask = masks.unit_mask(raw, 0.5, (8, 8))
    resized = np.asarray(Image.fromarray(raw, mode="F").resize((8, 8), Image.Resampling.BILINEAR))
    assert np.array_equal(mask, resized > 0.5)
    assert mask[:4, 4:].any() and not mask[:, :4].any() and not mask[4:].any()


def test_label_masks_scale_pixel_labels_and_cover_images_with_image_labels() -> None:
    pixel = np.zeros((2, 4, 4), dtype=np.int32)
    pixel[0, :2, :2] = 7
    pixel[1, 3, 3] = 9
    image = np.array([0, 0], dtype=np.int32)
    mask = masks.label_mask(pixel, image, {7, 9}, (8, 8))
    expected = np.zeros((8, 8), dtype=bool)
    expected[:4, :4] = True
    expected[6:, 6:] = True
    assert np.array_equal(mask, expected)
    assert masks.label_mask(pixel, np.array([3, 0]), {3}, (8, 8)).all()
    assert not masks.label_mask(pixel, image, set(), (8, 8)).any()


def test_highlight_keeps_the_masked_pixels_and_outlines_the_mask() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(10, 10, 3)).astype(np.uint8)
    mask = np.zeros((10, 10), dtype=bool)
    mask[3:6, 3:6] = True
    out = render.highlight(image, mask, "unit")
    assert np.array_equal(out[mask], image[mask])
    assert (out[2, 4] == render.OUTLINES["unit"]).all()  # the edge just outside the mask
    far = np.ones_like(mask)
    far[2:7, 2:7] = False
    assert (out[far] != image[far]).any(axis=-1).all()
