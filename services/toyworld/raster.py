"""Draw an `ImageSpec` at any resolution: RGB pixels and every per-pixel ground truth.

Geometry is evaluated at pixel centres, so the label maps at S/2 sample the same shapes
as the image at S. Colours are exact palette values (no anti-aliasing): every pixel has
one named colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.toyworld.layout import ImageSpec, TextureSpec, sample_spec
from services.toyworld.world import WORLD

PALETTE = np.array([rgb for _, rgb in WORLD.colors], dtype=np.uint8)  # (8, 3) uint8
STRIPE_DUTY = 0.4
DOT_RADIUS = 0.28  # in units of the dot period
OUTLINE_SCALE = 0.6  # the outline band: inside the shape, outside the shape shrunk by this
CENTRE_RADIUS = 0.7  # the centre: inside the shape, within this × radius of its centre


@dataclass(frozen=True)
class Raster:
    """One toy image drawn at R×R, with its ground truth at the same resolution."""

    rgb: np.ndarray  # (R, R, 3) uint8
    color: np.ndarray  # (R, R) int64, index into WORLD.colors
    shape: np.ndarray  # (R, R) int64, index into spec.shapes, -1 = background
    pattern: np.ndarray  # (R, R) bool, visible background-pattern pixels
    outline: np.ndarray  # (R, R) bool, outline band of any shape
    centre: np.ndarray  # (R, R) bool, centre of any shape


def rasterize(spec: ImageSpec, size: int) -> Raster:
    """Draw `spec` at `size`×`size` pixels."""
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    x, y = np.meshgrid(coords, coords)
    names = WORLD.color_names
    pattern = pattern_mask(spec.texture, x, y)
    color = np.where(pattern, names.index(spec.pattern_color), names.index(spec.background))
    shape = np.full((size, size), -1, dtype=np.int64)
    outline = np.zeros((size, size), dtype=bool)
    centre = np.zeros((size, size), dtype=bool)
    for i, item in enumerate(spec.shapes):
        dx, dy = x - item.cx, y - item.cy
        inside = shape_mask(item.kind, dx, dy, item.radius)
        shape[inside] = i
        color[inside] = names.index(item.color)
        outline |= inside & ~shape_mask(item.kind, dx, dy, OUTLINE_SCALE * item.radius)
        centre |= inside & (np.hypot(dx, dy) <= CENTRE_RADIUS * item.radius)
    return Raster(
        rgb=PALETTE[color],
        color=color.astype(np.int64),
        shape=shape,
        pattern=pattern & (shape < 0),
        outline=outline,
        centre=centre,
    )


def shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """(R, R) bool: points at offsets (dx, dy) from the centre inside a shape of `radius`."""
    ax, ay = np.abs(dx), np.abs(dy)
    if kind == "circle":
        return np.asarray(np.hypot(dx, dy) <= radius)
    if kind == "square":
        return np.asarray(np.maximum(ax, ay) <= radius / np.sqrt(2))
    if kind == "ring":
        d = np.hypot(dx, dy)
        return np.asarray((d <= radius) & (d >= 0.55 * radius))
    if kind == "cross":
        arm, half = 0.9 * radius, 0.3 * radius
        return np.asarray(((ax <= half) & (ay <= arm)) | ((ay <= half) & (ax <= arm)))
    if kind == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return _in_polygon(dx, dy, radius * np.cos(angles), radius * np.sin(angles))
    if kind == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = radius * np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return _in_polygon(dx, dy, radii * np.cos(angles), radii * np.sin(angles))
    raise ValueError(f"unknown shape {kind!r}; allowed: {', '.join(WORLD.shapes)}")


def pattern_mask(texture: TextureSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(R, R) bool: pixels at (x, y) in [0, 1]² drawn in the pattern colour."""
    t = texture
    if t.kind == "plain":
        return np.zeros(x.shape, dtype=bool)
    if t.kind == "stripes":
        across = x * np.cos(t.angle) + y * np.sin(t.angle)
        return np.asarray((across / t.period + t.phase) % 1.0 < STRIPE_DUTY)
    if t.kind == "waves":
        along, across = (x, y) if t.angle == 0.0 else (y, x)
        across = across + t.amplitude * np.sin(2 * np.pi * along / t.wavelength)
        return np.asarray((across / t.period + t.phase) % 1.0 < STRIPE_DUTY)
    if t.kind == "dots":
        cx = (x / t.period + t.phase) % 1.0 - 0.5
        cy = (y / t.period + t.phase) % 1.0 - 0.5
        return np.asarray(np.hypot(cx, cy) <= DOT_RADIUS)
    if t.kind == "checker":
        cells = np.floor(x / t.period + t.phase) + np.floor(y / t.period + t.phase)
        return np.asarray(cells % 2 == 0)
    raise ValueError(f"unknown texture {t.kind!r}; allowed: {', '.join(WORLD.textures)}")


def _in_polygon(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Even-odd rule: (R, R) bool, points inside the polygon with vertices (vx, vy)."""
    inside = np.zeros(x.shape, dtype=bool)
    j = len(vx) - 1
    for i in range(len(vx)):
        crosses = (vy[i] > y) != (vy[j] > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = (vx[j] - vx[i]) * (y - vy[i]) / (vy[j] - vy[i]) + vx[i]
        inside ^= crosses & (x < x_cross)
        j = i
    return inside


def render_images(
    seed: int, n_images: int, size: int, start: int = 0
) -> tuple[np.ndarray, list[ImageSpec]]:
    """Images start .. start+n_images-1 of the dataset with `seed`: (N, S, S, 3) uint8, specs."""
    specs = [sample_spec(seed, i) for i in range(start, start + n_images)]
    images = np.zeros((n_images, size, size, 3), dtype=np.uint8)
    for i, spec in enumerate(specs):
        images[i] = rasterize(spec, size).rgb
    return images, specs
