"""Write the toy world as a Broden-format probe directory (specs/netdissect.md, specs/toyworld.md).

Layout of `root`:

- `index.csv`: `image,split,ih,iw,sh,sw,color,object,part,material,scene,texture`; the part
  cell holds two PNG layers (outline band; centre) that overlap; material is empty; every
  50th image (index % 50 == 0) has its scene withheld as a literal `0`.
- `label.csv`, `category.csv`, `c_<category>.csv`: label numbers from `WORLD.labels`.
  `frequency` counts images; `coverage` is the mean fraction of an image a label covers
  over the images holding it (1.0 for image-level labels).
- `images/toy_NNNNNN.png` (image_size², RGB) and `images/toy_NNNNNN_{color,object,part_1,
  part_2}.png` (image_size/2, pixel label = R + 256·G).
- `captions.csv` (`image,caption`), `objects.csv` (`image,object,label,color,size,description`),
  `toyworld.json` (the generator parameters).

Every file is a pure function of (n_images, image_size, seed): no timestamps, fixed encoders.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from services.common.errors import InvalidArgument
from services.toyworld.captions import caption, describe_shape
from services.toyworld.layout import ImageSpec, sample_spec
from services.toyworld.raster import rasterize
from services.toyworld.world import WORLD

FORMAT_VERSION = 1
INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw", *WORLD.categories)
SCENE_WITHHELD_EVERY = 50
VAL_EVERY = 5
OBJECT_COLUMNS = ("image", "object", "label", "color", "size", "description")
PIXEL_PLANES = (("color", "color"), ("object", "object"), ("part", "part_1"), ("part", "part_2"))


def generate(
    root: Path,
    n_images: int,
    image_size: int,
    seed: int,
    on_image: Callable[[int], None] | None = None,
) -> Path:
    """Write a toy Broden directory of `n_images` images at `image_size` px; return `root`.

    `on_image(done)` is called after each image; an exception it raises stops the
    generation (that is how a cancelled job stops it).
    """
    _validate(n_images, image_size, seed)
    root = Path(root)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    tally = _Tally()
    index_rows: list[list[str]] = []
    caption_rows: list[list[str]] = []
    object_rows: list[list[str]] = []
    for i in range(n_images):
        spec = sample_spec(seed, i)
        stem = f"toy_{i:06d}"
        _write_image(images_dir, stem, spec, image_size, tally)
        scene = 0 if i % SCENE_WITHHELD_EVERY == 0 else WORLD.numbers[WORLD.scenes[spec.scene]]
        texture = WORLD.numbers[spec.texture.kind]
        for category, number in (("scene", scene), ("texture", texture)):
            if number:
                tally.image_level(category, number)
        tally.end_image()
        split = "val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"
        index_rows.append(_index_row(stem, split, image_size, scene, texture))
        caption_rows.append([f"{stem}.png", caption(spec)])
        for k, s in enumerate(spec.shapes):
            size = "small" if s.small else "large"
            object_rows.append([f"{stem}.png", str(k), s.kind, s.color, size, describe_shape(s)])
        if on_image is not None:
            on_image(i + 1)
    write_csv(root / "index.csv", INDEX_COLUMNS, index_rows)
    write_csv(root / "captions.csv", ("image", "caption"), caption_rows)
    write_csv(root / "objects.csv", OBJECT_COLUMNS, object_rows)
    tally.write(root)
    params = {
        "format_version": FORMAT_VERSION,
        "n_images": n_images,
        "image_size": image_size,
        "seed": seed,
    }
    (root / "toyworld.json").write_text(json.dumps(params, sort_keys=True, indent=2) + "\n")
    return root


def _index_row(stem: str, split: str, image_size: int, scene: int, texture: int) -> list[str]:
    size, mask = str(image_size), str(image_size // 2)
    parts = f"{stem}_part_1.png;{stem}_part_2.png"
    pixel = [f"{stem}_color.png", f"{stem}_object.png", parts, ""]  # color, object, part, material
    return [f"{stem}.png", split, size, size, mask, mask, *pixel, str(scene), str(texture)]


def label_planes(spec: ImageSpec, mask_size: int) -> np.ndarray:
    """(4, s, s) int64 global label numbers: color, object, part outline, part centre."""
    raster = rasterize(spec, mask_size)
    numbers = WORLD.numbers
    color = np.array([numbers[c] for c in WORLD.color_names])[raster.color]
    shape_numbers = np.array([0] + [numbers[s.kind] for s in spec.shapes])
    objects = shape_numbers[raster.shape + 1]
    if spec.texture.kind == "dots":
        objects = np.where(raster.pattern, numbers["dots"], objects)
    outline = np.where(raster.outline, numbers["outline"], 0)
    centre = np.where(raster.centre, numbers["centre"], 0)
    return np.stack([color, objects, outline, centre]).astype(np.int64)


def encode_labels(plane: np.ndarray) -> np.ndarray:
    """(s, s) label numbers -> (s, s, 3) uint8 with R = n % 256, G = n // 256, B = 0."""
    out = np.zeros((*plane.shape, 3), dtype=np.uint8)
    out[..., 0] = plane % 256
    out[..., 1] = plane // 256
    return out


def decode_labels(rgb: np.ndarray) -> np.ndarray:
    """(s, s, 3) uint8 label PNG pixels -> (s, s) int64 label numbers (R + 256·G)."""
    return rgb[..., 0].astype(np.int64) + 256 * rgb[..., 1].astype(np.int64)


class _Tally:
    """Per-category label frequencies and coverages, accumulated image by image."""

    def __init__(self) -> None:
        self.frequency: dict[tuple[str, int], int] = defaultdict(int)
        self.coverage: dict[tuple[str, int], float] = defaultdict(float)
        self.category_images: dict[str, int] = defaultdict(int)
        self._current: dict[tuple[str, int], float] = defaultdict(float)

    def pixel_plane(self, category: str, plane: np.ndarray) -> None:
        counts = np.bincount(plane.ravel())
        for number in np.flatnonzero(counts[1:]) + 1:
            self._current[category, int(number)] += counts[number] / plane.size

    def image_level(self, category: str, number: int) -> None:
        self._current[category, number] = 1.0

    def end_image(self) -> None:
        for key, fraction in self._current.items():
            self.frequency[key] += 1
            self.coverage[key] += fraction
        for category in {category for category, _ in self._current}:
            self.category_images[category] += 1
        self._current = defaultdict(float)

    def write(self, root: Path) -> None:
        """Write `label.csv`, `category.csv` and one `c_<category>.csv` per category."""
        categories = [c for c in WORLD.categories if any(c in x.categories for x in WORLD.labels)]
        category_rows = []
        for category in categories:
            labels = [x for x in WORLD.labels if category in x.categories]
            rows = [
                [str(code), str(x.number), x.name, *self._stats(category, x.number)]
                for code, x in enumerate(labels, start=1)
            ]
            write_csv(
                root / f"c_{category}.csv",
                ("code", "number", "name", "frequency", "coverage"),
                rows,
            )
            numbers = [x.number for x in labels]
            first, last, count = str(min(numbers)), str(max(numbers)), str(len(labels))
            category_rows.append(
                [category, first, last, count, str(self.category_images[category])]
            )
        write_csv(
            root / "category.csv", ("name", "first", "last", "count", "frequency"), category_rows
        )
        label_rows = []
        for x in WORLD.labels:
            cell = ";".join(f"{c}({self.frequency[c, x.number]})" for c in x.categories)
            # label.csv repeats the figures of the label's primary category.
            best = max(x.categories, key=lambda c: self._mean_coverage(c, x.number))
            frequency, coverage = self._stats(best, x.number)
            label_rows.append([str(x.number), x.name, cell, frequency, coverage, ""])
        header = ("number", "name", "category", "frequency", "coverage", "syns")
        write_csv(root / "label.csv", header, label_rows)

    def _mean_coverage(self, category: str, number: int) -> float:
        frequency = self.frequency[category, number]
        return self.coverage[category, number] / frequency if frequency else 0.0

    def _stats(self, category: str, number: int) -> tuple[str, str]:
        frequency = self.frequency[category, number]
        return str(frequency), f"{self._mean_coverage(category, number):.6f}"


def _validate(n_images: int, image_size: int, seed: int) -> None:
    if n_images < 1:
        raise InvalidArgument(f"must be at least 1, got {n_images}", field="n_images")
    if image_size < 16 or image_size % 2:
        raise InvalidArgument(f"must be even and at least 16, got {image_size}", field="image_size")
    if seed < 0:
        raise InvalidArgument(f"must be non-negative, got {seed}", field="seed")


def _write_image(
    images_dir: Path, stem: str, spec: ImageSpec, image_size: int, tally: _Tally
) -> None:
    """Write one image and its four label PNGs; count its pixel labels into `tally`."""
    _save_png(rasterize(spec, image_size).rgb, images_dir / f"{stem}.png")
    planes = label_planes(spec, image_size // 2)
    for (category, suffix), plane in zip(PIXEL_PLANES, planes, strict=True):
        _save_png(encode_labels(plane), images_dir / f"{stem}_{suffix}.png")
        tally.pixel_plane(category, plane)


def _save_png(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path, format="PNG", compress_level=6)


def write_csv(path: Path, columns: tuple[str, ...], rows: list[list[str]]) -> None:
    """Write a header and rows, LF line endings (the same bytes on every platform)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
