"""What is where in one toy image, sampled from a seed; resolution-free (unit square coordinates).

Image `index` of a dataset with seed `seed` is drawn from its own generator seeded with
`(seed, index)`, so an image does not depend on how many images are generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.toyworld.world import WORLD

LARGE_RADIUS = (0.16, 0.22)
SMALL_RADIUS = (0.09, 0.12)
SHAPE_COUNT_WEIGHTS = (0.4, 0.35, 0.25)  # P(1 shape), P(2), P(3)
MARGIN = 0.02
ORIENTATIONS = {"stripes": 4, "waves": 2}  # evenly spaced over half a turn


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: its kind, colour, centre (x right, y down, in [0, 1]) and circumradius."""

    kind: str
    color: str
    cx: float
    cy: float
    radius: float
    small: bool


@dataclass(frozen=True)
class TextureSpec:
    """The background pattern and its geometry (lengths in image widths, angle in radians)."""

    kind: str
    angle: float = 0.0
    period: float = 0.0
    phase: float = 0.0
    amplitude: float = 0.0
    wavelength: float = 1.0


@dataclass(frozen=True)
class ImageSpec:
    """A whole toy image: background colour, pattern (colour and texture) and shapes."""

    background: str
    pattern_color: str
    texture: TextureSpec
    shapes: tuple[ShapeSpec, ...]

    @property
    def scene(self) -> int:
        """Index into `WORLD.scenes`."""
        return WORLD.scene_index(self.background, self.texture.kind)


def sample_spec(seed: int, index: int) -> ImageSpec:
    """Draw image `index` of the dataset with seed `seed`."""
    rng = np.random.default_rng([seed, index])
    background = WORLD.background_colors[rng.integers(len(WORLD.background_colors))]
    pattern_color = WORLD.pattern_colors[rng.integers(len(WORLD.pattern_colors))]
    texture = _sample_texture(rng, WORLD.textures[rng.integers(len(WORLD.textures))])
    excluded = {background} if texture.kind == "plain" else {background, pattern_color}
    shape_colors = [c for c in WORLD.color_names if c not in excluded]
    count = 1 + int(rng.choice(len(SHAPE_COUNT_WEIGHTS), p=SHAPE_COUNT_WEIGHTS))
    shapes: list[ShapeSpec] = []
    for i in range(count):
        small = i > 0 and bool(rng.random() < 0.5)
        radius = float(rng.uniform(*(SMALL_RADIUS if small else LARGE_RADIUS)))
        kind = WORLD.shapes[rng.integers(len(WORLD.shapes))]
        color = shape_colors[rng.integers(len(shape_colors))]
        centre = _place(rng, radius, shapes)
        if centre is not None:
            shapes.append(ShapeSpec(kind, color, centre[0], centre[1], radius, small))
    return ImageSpec(background, pattern_color, texture, tuple(shapes))


def _sample_texture(rng: np.random.Generator, kind: str) -> TextureSpec:
    if kind == "plain":
        return TextureSpec(kind)
    orientations = ORIENTATIONS.get(kind, 1)
    angle = float(rng.integers(orientations)) * np.pi / orientations
    return TextureSpec(
        kind=kind,
        angle=angle,
        period=float(rng.uniform(0.12, 0.2)),
        phase=float(rng.random()),
        amplitude=float(rng.uniform(0.03, 0.05)),
        wavelength=float(rng.uniform(0.3, 0.5)),
    )


def _place(
    rng: np.random.Generator, radius: float, placed: list[ShapeSpec]
) -> tuple[float, float] | None:
    """A centre keeping the shape inside the image and apart from `placed`, or None."""
    lo, hi = radius + MARGIN, 1.0 - radius - MARGIN
    for _ in range(50):
        cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        if all(np.hypot(cx - s.cx, cy - s.cy) > radius + s.radius + MARGIN for s in placed):
            return cx, cy
    return None
