"""The bounds of a job's toy world: the largest allowed ones pass, one step beyond fails."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument, ResourceExhausted
from services.toyworld import limits


def test_the_largest_allowed_toy_worlds_fit_the_pixel_budget() -> None:
    limits.check_toy_world(limits.MAX_IMAGES, limits.DEFAULT_IMAGE_SIZE, 0, "t")
    side = limits.MAX_IMAGE_SIZE
    limits.check_toy_world(limits.MAX_PIXELS // side**2, side, 0, "t")
    with pytest.raises(ResourceExhausted, match=r"^t.n_images: .*at most 100000000"):
        limits.check_toy_world(limits.MAX_PIXELS // side**2 + 1, side, 0, "t")


@pytest.mark.parametrize(("n_images", "image_size", "seed", "field"), [
    (limits.MAX_IMAGES + 1, 0, 0, "t.n_images"),
    (-1, 0, 0, "t.n_images"),
    (1, limits.MAX_IMAGE_SIZE + 2, 0, "t.image_size"),
    (1, limits.MIN_IMAGE_SIZE - 2, 0, "t.image_size"),
    (1, 33, 0, "t.image_size"),
    (1, 0, -1, "t.seed"),
    (1, 0, limits.MAX_SEED + 1, "t.seed"),
])
def test_one_step_beyond_a_limit_is_refused_naming_the_field(
    n_images: int, image_size: int, seed: int, field: str
) -> None:
    with pytest.raises(InvalidArgument, match=rf"^{field}: "):
        limits.check_toy_world(n_images, image_size, seed, "t")
