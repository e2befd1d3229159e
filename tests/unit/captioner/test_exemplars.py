import numpy as np
import pytest

from services.captioner.exemplars import (
    StreamedThresholds,
    exemplar_masks,
    spatial_max,
    top_images,
    unit_thresholds,
)
from services.common.errors import InvalidArgument


def test_top_images_rank_by_spatial_max_best_first() -> None:
    acts = np.zeros((5, 2, 3, 3), dtype=np.float32)
    acts[:, 0, 1, 1] = [0.1, 0.9, 0.5, 0.3, 0.7]  # unit 0: max at one position
    acts[:, 1] = -1.0
    acts[3, 1, 0, 2] = 4.0  # unit 1: a single strong pixel in image 3
    acts[0, 1, 2, 0] = 2.0
    unit_max = spatial_max(acts)
    assert unit_max.shape == (5, 2)
    np.testing.assert_array_equal(top_images(unit_max, k=3), [[1, 4, 2], [3, 0, 1]])


def test_top_images_break_ties_by_lower_index_and_check_k() -> None:
    np.testing.assert_array_equal(top_images(np.ones((4, 1)), k=2), [[0, 1]])
    with pytest.raises(InvalidArgument, match="exemplars"):
        top_images(np.ones((4, 1)), k=5)


def test_thresholds_are_the_exact_quantile_over_all_images_and_positions() -> None:
    acts = np.zeros((4, 2, 5, 5), dtype=np.float16)
    acts[:, 0] = np.arange(100).reshape(4, 5, 5)  # unit 0 takes values 0..99
    acts[:, 1] = 7.0
    # 0.99 quantile of 0..99 by linear interpolation: position 0.99·99 = 98.01
    np.testing.assert_allclose(unit_thresholds(acts), [98.01, 7.0])
    np.testing.assert_allclose(unit_thresholds(acts, 0.5), [49.5, 7.0])


def test_masks_upsample_bilinearly_without_aligned_corners_then_threshold() -> None:
    maps = np.zeros((1, 1, 2, 2), dtype=np.float32)
    maps[0, 0, 1, 1] = 1.0
    # 2 → 4 with align_corners=False weighs the hot cell by (0, .25, .75, 1) per axis,
    # so only the 2×2 bottom-right block exceeds 0.5 (.5625, .75, .75, 1); with
    # aligned corners (0, 1/3, 2/3, 1) the cell (2, 2) would be .44 and drop out.
    masks = exemplar_masks(maps, np.array([0.5]), (4, 4))
    expected = np.zeros((1, 1, 1, 4, 4), dtype=np.uint8)
    expected[..., 2:, 2:] = 1
    assert masks.dtype == np.uint8
    np.testing.assert_array_equal(masks, expected)


def test_each_unit_uses_its_own_threshold() -> None:
    maps = np.full((2, 3, 2, 2), 5.0, dtype=np.float32)
    masks = exemplar_masks(maps, np.array([4.0, 6.0]), (8, 8))
    assert masks.shape == (2, 3, 1, 8, 8)
    assert masks[0].all() and not masks[1].any()


@pytest.mark.parametrize("quantile", [0.0, 0.01, 0.3, 0.5, 0.99, 0.995, 1.0])
@pytest.mark.parametrize("shape", [(37, 3, 5, 5), (5, 2, 1, 1), (1, 2, 1, 1)])
def test_streamed_thresholds_equal_numpys_quantile_bit_for_bit(
    quantile: float, shape: tuple[int, int, int, int]
) -> None:
    acts = np.random.default_rng(0).standard_normal(shape).astype(np.float16).astype(np.float32)
    streamed = StreamedThresholds(shape[0] * shape[2] * shape[3], quantile)
    for i0 in range(0, shape[0], 7):  # chunks of 7 images
        streamed.update(acts[i0 : i0 + 7])
    np.testing.assert_array_equal(streamed.thresholds(), unit_thresholds(acts, quantile))
    # only the tail beyond the quantile's rank is kept, not every value
    assert streamed.width <= max(2, shape[0] * shape[2] * shape[3] // 2 + 1)


def test_streamed_thresholds_need_every_value() -> None:
    streamed = StreamedThresholds(8, 0.99)
    streamed.update(np.zeros((1, 2, 2, 2), dtype=np.float32))
    with pytest.raises(InvalidArgument, match="got 4 of 8"):
        streamed.thresholds()
    streamed.update(np.zeros((1, 2, 2, 2), dtype=np.float32))
    with pytest.raises(InvalidArgument, match="more than 8"):
        streamed.update(np.zeros((1, 2, 2, 2), dtype=np.float32))
