"""Grid masks of spatial formulas: downsampling, expansion, bitboards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional

from services.common.spec_vocabulary import GridDownsampling
from services.explainer.spatial_masks import Grid, expand, label_grid_masks, nonempty, popcount


def downsample(
    masks: np.ndarray, shape: tuple[int, int], method: GridDownsampling, fraction: float = 0.5
) -> np.ndarray:
    """(N, H, W) bool -> (N, h, w) bool through `label_grid_masks` (label 1, no image labels)."""
    grid = Grid(*shape)
    pixel = masks.astype(np.int32)[:, None]
    bits = label_grid_masks(pixel, np.zeros((len(masks), 1), np.int32), np.array([1]), grid,
                            method, fraction)
    return grid.unpack(bits[0])


def dense_neighbourhood(masks: np.ndarray) -> np.ndarray:
    """(N, h, w) bool -> cells with an on cell at squared distance ≤ 5, by definition."""
    h, w = masks.shape[1:]
    out = np.zeros_like(masks)
    for i in range(h):
        for j in range(w):
            for a in range(h):
                for b in range(w):
                    if (i - a) ** 2 + (j - b) ** 2 <= 5:
                        out[:, i, j] |= masks[:, a, b]
    return out


def test_manual_fraction_known_answer() -> None:
    # 100 on-pixels in the top-left 16×16 block of a 112×112 mask: cell (0, 0) of 7×7.
    mask = np.zeros((1, 112, 112), dtype=bool)
    mask[0, :16, :16].flat[np.random.default_rng(0).permutation(256)[:100]] = True
    assert downsample(mask, (7, 7), "manual", 100 / 256)[0, 0, 0]
    assert not downsample(mask, (7, 7), "manual", 101 / 256)[0, 0, 0]
    assert downsample(mask, (7, 7), "manual", 100 / 256).sum() == 1


def test_manual_cells_for_grids_that_do_not_divide_the_mask() -> None:
    # 10 pixels onto 3 cells: edges 0, 3, 6, 10 (cells of 3, 3 and 4 pixels).
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 6:10, 6:8] = True  # half of the last 4×4 cell
    grid = downsample(mask, (3, 3), "manual", 0.5)
    assert grid[0, 2, 2] and grid.sum() == 1
    assert not downsample(mask, (3, 3), "manual", 0.51)[0, 2, 2]
    # A grid finer than the mask has empty cells: refused, not silently emptied.
    with pytest.raises(ValueError, match="empty cells"):
        downsample(mask, (11, 11), "manual", 0.5)


def test_nearest_reads_each_cells_centre_pixel_and_bilinear_its_two_neighbours() -> None:
    mask = np.zeros((1, 112, 112), dtype=bool)
    mask[0, 8, 8] = True  # the centre pixel of cell (0, 0): floor(0.5 · 16) = 8
    assert downsample(mask, (7, 7), "nearest")[0].sum() == 1
    assert downsample(mask, (7, 7), "nearest")[0, 0, 0]
    # Bilinear at half-pixel centres reads pixels 7 and 8 (weights ½): a lone pixel 8
    # on both axes gives ¼ < ½.
    assert not downsample(mask, (7, 7), "bilinear")[0].any()
    mask[0, 7:9, 7:9] = True
    assert downsample(mask, (7, 7), "bilinear")[0, 0, 0]
    assert not downsample(mask, (7, 7), "manual", 100 / 256)[0].any()


@pytest.mark.parametrize(
    ("size", "shape"), [(112, (7, 7)), (16, (4, 4)), (10, (3, 4)), (9, (9, 9))]
)
def test_bilinear_is_torchs_interpolation_thresholded_at_a_half(
    size: int, shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(size)
    masks = rng.random((5, size, size)) < 0.4
    values = torch.from_numpy(masks.astype(np.float32))[:, None]
    want = functional.interpolate(values, size=shape, mode="bilinear", align_corners=False)
    assert (downsample(masks, shape, "bilinear") == (want[:, 0] >= 0.5).numpy()).all()


def test_labels_in_several_planes_and_image_level_labels() -> None:
    grid = Grid(2, 2)
    pixel = np.zeros((2, 2, 4, 4), dtype=np.int32)
    pixel[0, 0, :2, :2] = 3  # label 3 on all of cell (0, 0) in plane 0 …
    pixel[0, 1, :2, :2] = 3  # … and again in plane 1: counted once per pixel
    pixel[0, 1, 2:, 2:3] = 5  # label 5 on half of cell (1, 1)
    image = np.array([[0, 7], [7, 9]], dtype=np.int32)
    bits = label_grid_masks(pixel, image, np.array([3, 5, 7]), grid, "manual", 0.5)
    three, five, seven = (grid.unpack(b) for b in bits)
    assert three[0].tolist() == [[True, False], [False, False]] and not three[1].any()
    assert five[0, 1, 1] and five.sum() == 1
    assert seven.all()  # image-level in both images: the whole grid
    five_strict = label_grid_masks(pixel, image, np.array([5]), grid, "manual", 0.51)
    assert not grid.unpack(five_strict).any()


def test_expansion_on_a_hand_drawn_grid() -> None:
    drawn = np.array(
        [
            [0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 1, 0, 0, 0],
            [0, 0, 0, 0, 1],
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    # Off cells with ≥ 3 on neighbours: (0,1) sees (1,1),(1,2) = 2: stays off; (2,2) sees
    # (1,1),(1,2),(2,1) = 3: on; (1,0) and (2,0) see (1,1),(2,1) = 2: off.
    want = drawn.copy()
    want[2, 2] = True
    assert (expand(drawn[None], 3)[0] == want).all()
    # Threshold 2: every off cell with two on neighbours joins as well.
    two = expand(drawn[None], 2)[0]
    assert two[0, 1] and two[1, 0] and two[2, 0] and two[0, 2] and not two[4, 4]
    assert (two >= drawn).all()


@pytest.mark.parametrize("shape", [(7, 7), (2, 2), (9, 10), (14, 14), (1, 65)])
def test_bitboards_match_dense_masks(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    dense = rng.random((6, *shape)) < 0.15
    dense[0] = False
    grid = Grid(*shape)
    bits = grid.pack(dense)
    assert bits.shape == (6, grid.words) and bits.dtype == np.uint64
    assert (grid.unpack(bits) == dense).all()
    assert (popcount(bits) == dense.sum(axis=(1, 2))).all()
    assert (nonempty(bits) == dense.any(axis=(1, 2))).all()
    assert (grid.unpack(grid.complement(bits)) == ~dense).all()
    assert (grid.unpack(grid.neighbourhood(bits)) == dense_neighbourhood(dense)).all()


def test_neighbourhood_is_the_box_without_corners_clamped_at_the_border() -> None:
    grid = Grid(7, 7)
    one = np.zeros((1, 7, 7), dtype=bool)
    one[0, 3, 3] = True
    near = grid.unpack(grid.neighbourhood(grid.pack(one)))[0]
    assert near.sum() == 21 and near[1:6, 1:6].sum() == 21
    assert not near[1, 1] and not near[5, 5] and near[1, 2] and near[5, 4]
    corner = np.zeros((1, 7, 7), dtype=bool)
    corner[0, 0, 0] = True
    assert grid.unpack(grid.neighbourhood(grid.pack(corner)))[0].sum() == 8  # 3×3 minus (2,2)
