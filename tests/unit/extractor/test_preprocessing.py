"""Named preprocessing: exact normalisation constants and no cropping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.errors import InvalidArgument
from services.extractor.preprocessing import preprocessing


def _solid(rgb: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> Image.Image:
    return Image.fromarray(np.full((size[1], size[0], 3), rgb, dtype=np.uint8))


def test_netdissect_subtracts_mean_rgb_and_divides_by_255_times_0224() -> None:
    prep = preprocessing("netdissect", 4)
    out = prep(_solid((255, 0, 100)))
    expected = [
        (255 - 124.6901) / (255 * 0.224),
        (0 - 118.6897) / (255 * 0.224),
        (100 - 109.5388) / (255 * 0.224),
    ]
    assert out.shape == (3, 4, 4) and out.dtype == torch.float32
    for channel, value in enumerate(expected):
        assert out[channel].flatten().tolist() == pytest.approx([value] * 16, rel=1e-5)


def test_imagenet_and_clip_normalisation() -> None:
    out = preprocessing("imagenet", 2)(_solid((255, 128, 0)))
    assert out[:, 0, 0].tolist() == pytest.approx(
        [(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0 - 0.406) / 0.225], rel=1e-5)
    out = preprocessing("clip", 2)(_solid((0, 0, 0)))
    assert out[:, 0, 0].tolist() == pytest.approx(
        [-0.48145466 / 0.26862954, -0.4578275 / 0.26130258, -0.40821073 / 0.27577711], rel=1e-5)


def test_resize_is_square_without_crop() -> None:
    image = np.zeros((4, 8, 3), dtype=np.uint8)
    image[:, :4] = 255  # left half white: a centre crop would lose the proportions
    pixels = preprocessing("imagenet", 8).resize(Image.fromarray(image))
    assert pixels.shape == (3, 8, 8) and pixels.dtype == torch.uint8
    assert pixels[0, :, 0].tolist() == [255] * 8 and pixels[0, :, -1].tolist() == [0] * 8


def test_batch_normalize_matches_single_image() -> None:
    prep = preprocessing("netdissect", 4)
    image = _solid((10, 20, 30))
    batch = prep.normalize(torch.stack([prep.resize(image)] * 2))
    torch.testing.assert_close(batch[1], prep(image))


def test_unknown_preprocessing_names_the_choices() -> None:
    allowed = r"model.preprocessing.*'imagenet', 'netdissect', 'clip'"
    with pytest.raises(InvalidArgument, match=allowed):
        preprocessing("caffe", 224)
